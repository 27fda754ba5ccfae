"""Decoding options: one frozen `GenerationSettings`, its one `validate()`, and the CLI flags derived from it.

Every path that decodes captions takes this type: `Captioner` (caption/captioner.py), `prefixcap caption`,
`prefixcap evaluate --model`, the HTTP service's request schema (serve/schemas.py) and the dynamic
batcher's grouping key (serve/batching.py). Field names and meanings are those of transformers'
`generate`. The bounds below hold for every caller; a server may cap lower as its own policy.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from prefixcap.argtypes import boolean
from prefixcap.errors import UsageError

# --- bounds (inclusive unless noted) -----------------------------------------------------------
# generate divides the logits by the temperature: at 1e-40 float32 logits overflow to inf and
# sampling fails on inf/nan probabilities; 0.01 keeps a logit range of ~1e3 x the model's.
MIN_TEMPERATURE = 1e-2
# Above ~100 every logit row is flat to float precision: no caption would differ from noise.
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 10_000  # 0 disables top-k filtering; larger than any caption LM vocabulary needs
# top_p lies in (0, 1]: 0 would keep no token.
# generate divides positive logits by the penalty (and multiplies negative ones): near 0 they
# overflow, as with the temperature; 10 already forbids any repetition in practice.
MIN_REPETITION_PENALTY = 1e-2
MAX_REPETITION_PENALTY = 10.0
MAX_LENGTH_PENALTY = 10.0  # |length_penalty|: the exponent of the length in the beam score
# Beam search keeps num_beams x batch sequences and their caches: memory grows linearly.
MAX_NUM_BEAMS = 64
MAX_RETURN_SEQUENCES = 64
MAX_NEW_TOKENS = 1024  # captions are short; also bounds a request's decoding time

SAMPLING_ONLY = ("temperature", "top_k", "top_p")  # ignored unless do_sample
BEAM_ONLY = ("length_penalty",)  # ignored unless num_beams > 1


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field: [low, high], or (low, high] when `low_open`."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    optional: bool = False  # None is allowed too (it means "the model's default")

    def expectation(self) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"{kind} in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}]"

    def contains(self, value: int | float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


RANGES: dict[str, Range] = {
    "num_beams": Range(1, MAX_NUM_BEAMS, integer=True),
    "temperature": Range(MIN_TEMPERATURE, MAX_TEMPERATURE),
    "top_k": Range(0, MAX_TOP_K, integer=True),
    "top_p": Range(0, 1, low_open=True),
    "repetition_penalty": Range(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
    "length_penalty": Range(-MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY),
    "max_new_tokens": Range(1, MAX_NEW_TOKENS, integer=True, optional=True),
    "num_return_sequences": Range(1, MAX_RETURN_SEQUENCES, integer=True),
}


class GenerationSettingsError(UsageError):
    """Decoding options out of range or of the wrong type; `problems` maps each field to its message."""

    def __init__(self, problems: dict[str, str]):
        super().__init__("; ".join(problems.values()))
        self.problems = problems


def _help(text: str, default_text: str | None = None) -> dict[str, str]:
    return {"help": text, "default_text": default_text} if default_text else {"help": text}


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options, passed on to the LM's `generate` (same names and meanings).

    Frozen, hence hashable: the batcher groups requests by equal settings. Build it, then call
    `validate()` (constructing never raises, so every problem can be reported at once).
    `max_new_tokens=None` means the longest caption the model saw in training (its config's
    max_token_length), capped by the LM's context length.
    """

    num_beams: int = field(default=1, metadata=_help("1 = greedy; > 1 = beam search"))
    do_sample: bool = field(default=False, metadata=_help("sample instead of greedy / beam search"))
    temperature: float = field(default=1.0, metadata=_help("sampling only: < 1 sharper, > 1 flatter"))
    top_k: int = field(default=50, metadata=_help("sampling only: keep the k most likely tokens (0 = all)"))
    top_p: float = field(default=1.0, metadata=_help("sampling only: nucleus probability mass"))
    repetition_penalty: float = field(default=1.0, metadata=_help("> 1 discourages repeated tokens"))
    length_penalty: float = field(default=1.0, metadata=_help(
        "beam search only: score = sum log p / length ** length_penalty"))
    max_new_tokens: int | None = field(default=None, metadata=_help(
        "longest caption in tokens", "the longest caption the model was trained with"))
    num_return_sequences: int = field(default=1, metadata=_help(
        "captions per image (needs num_beams >= it, or sampling)"))

    # --- validation ------------------------------------------------------------------------
    def problems(self) -> dict[str, str]:
        """Field -> what is wrong with it; empty when the settings are valid."""
        out = {f.name: p for f in fields(self) if (p := field_problem(f.name, getattr(self, f.name)))}
        if not out.keys() & {"num_beams", "num_return_sequences", "do_sample"} \
                and not self.do_sample and self.num_return_sequences > self.num_beams:
            out["num_return_sequences"] = (
                f"num_return_sequences={self.num_return_sequences} needs num_beams >= "
                f"{self.num_return_sequences} (or do_sample=true): greedy/beam search can only return "
                "as many distinct captions as it keeps beams")
        return out

    def validate(self) -> GenerationSettings:
        """Self, or GenerationSettingsError naming every bad field, what was given and what is allowed."""
        problems = self.problems()
        if problems:
            raise GenerationSettingsError(problems)
        return self

    # --- what generate gets ------------------------------------------------------------------
    def inactive(self) -> tuple[str, ...]:
        """Fields that cannot change the result under these settings."""
        return (() if self.do_sample else SAMPLING_ONLY) + (BEAM_ONLY if self.num_beams == 1 else ())

    def normalized(self) -> GenerationSettings:
        """The same decoding with every inactive field at its default, so that requests that decode
        identically compare and hash equal (greedy at temperature 0.5 == greedy at 2.0)."""
        return replace(self, **{name: _DEFAULTS[name] for name in self.inactive()})

    def generate_kwargs(self) -> dict[str, Any]:
        """The knobs as `generate` keywords. Inactive ones are left out (generate warns about
        them), and so is max_new_tokens: the captioner resolves it against the LM's context."""
        kwargs = asdict(self)
        for name in (*self.inactive(), "max_new_tokens"):
            kwargs.pop(name)
        return kwargs

    @classmethod
    def split_kwargs(cls, base: GenerationSettings | None, kwargs: dict[str, Any]
                     ) -> tuple[GenerationSettings, dict[str, Any]]:
        """Settings = base overridden by the kwargs naming its fields, validated; the rest goes to
        `generate` verbatim."""
        names = {f.name for f in fields(cls)}
        settings = replace(base or cls(), **{k: v for k, v in kwargs.items() if k in names})
        return settings.validate(), {k: v for k, v in kwargs.items() if k not in names}


_DEFAULTS: dict[str, Any] = asdict(GenerationSettings())
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GenerationSettings))


# --- one field -----------------------------------------------------------------------------------
def expectation(name: str) -> str:
    """What field `name` accepts, in words ("a number in [0.01, 100]")."""
    return "true or false" if name == "do_sample" else RANGES[name].expectation()


def field_problem(name: str, value: Any, bounds: Range | None = None) -> str | None:
    """Why `value` is not allowed for field `name` (within `bounds`, default RANGES[name]), or None.
    Types are strict: a bool is not a number, and an integer field takes no float (1.0); a float
    field takes an int."""
    if name == "do_sample":
        if isinstance(value, bool):
            return None
        return f"do_sample={_show(value)} is not a boolean (got {type(value).__name__}): expected true or false"
    rng = bounds or RANGES[name]
    if value is None and rng.optional:
        return None
    numeric = (int,) if rng.integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        return (f"{name}={_show(value)} has the wrong type ({type(value).__name__}): "
                f"expected {rng.expectation()}")
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}={value} is not finite: expected {rng.expectation()}"
    if not rng.contains(value):
        return f"{name}={_show(value)} is out of range: expected {rng.expectation()}"
    return None


def parse_field(name: str, text: str) -> Any:
    """Text (a CLI flag value, a form field) -> the field's type; ValueError saying what was
    expected. Ranges are checked by `validate()`, not here."""
    text = text.strip()
    try:
        if name == "do_sample":
            return boolean(text)
        rng = RANGES[name]
        if rng.optional and text.lower() in ("", "none", "null"):
            return None
        if len(text) > 40:  # int() of a huge digit string is slow, then refused (4300 digits) anyway
            raise ValueError
        return int(text) if rng.integer else float(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"expected {expectation(name)}, got {_show(text)}") from None


# --- command-line flags ---------------------------------------------------------------------------
def _flag_type(name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = parse_field(name, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if field_problem(name, value) is not None:
            raise argparse.ArgumentTypeError(f"expected {expectation(name)}, got {_show(text)}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_generation_args(parser: argparse.ArgumentParser, exclude: Iterable[str] = (),
                        title: str = "decoding (passed to the language model's generate)"
                        ) -> argparse._ArgumentGroup:
    """One `--<field>` flag per GenerationSettings field (but `exclude`), with its default and range
    in the help; a value out of range is a usage error (exit 2) naming the flag."""
    skip = set(exclude)
    group = parser.add_argument_group(title)
    for f in fields(GenerationSettings):
        if f.name in skip:
            continue
        if f.name == "do_sample":
            group.add_argument("--do_sample", action="store_true", help=f.metadata["help"])
            continue
        default_text = f.metadata.get("default_text") or "%(default)s"
        group.add_argument(f"--{f.name}", type=_flag_type(f.name), default=f.default,
                           metavar=("N" if RANGES[f.name].integer else "X"),
                           help=f"{f.metadata['help']}; {expectation(f.name)} (default: {default_text})")
    return group


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The validated settings from the flags `add_generation_args` added (defaults for excluded ones)."""
    return GenerationSettings(**{name: getattr(args, name) for name in FIELD_NAMES if hasattr(args, name)}
                              ).validate()


# --- formatting ------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:g}"


def _show(value: Any) -> str:
    """A short, safe rendering of a given value (str() of a 5,000-digit int raises, and floods logs)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"<a {value.bit_length()}-bit integer>"
    if isinstance(value, str) and len(value) > 40:
        return f"{value[:20]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
