"""argparse value types shared by every subcommand (one message style for bad flag values)."""

from __future__ import annotations

import argparse


def boolean(value: str) -> bool:
    """'true'/'false' (and yes/no, 1/0, on/off), as the seed's flags accept them."""
    lowered = str(value).strip().lower()
    if lowered in {"1", "true", "yes", "y", "on"}:
        return True
    if lowered in {"0", "false", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _integer(value: str, minimum: int, expectation: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expectation}, got {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"expected {expectation}, got {value!r}")
    return number


def positive_int(value: str) -> int:
    return _integer(value, 1, "a positive integer")


def non_negative_int(value: str) -> int:
    return _integer(value, 0, "an integer >= 0")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it informs: not to switches (a `--no_x` switch's stored
    default is the opposite of what it does), not to None defaults, not when the help already says."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0
                or "default" in help_ or not action.option_strings):
            return help_
        return super()._get_help_string(action)
