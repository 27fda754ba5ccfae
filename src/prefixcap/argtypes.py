"""argparse value types, the help formatter and the parser shared by every subcommand (one style of errors).

Every command builds its parser with `ArgumentParser` here: help texts show the defaults that
inform (`DefaultsHelpFormatter`), and a wrong flag value is one line naming the flag, plus where to
look (`prefixcap train: error: argument --epochs: expected a positive integer, got 'x' (see
prefixcap train --help)`), not the whole usage block first.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, NoReturn


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
    default is the opposite of what it does), not to None defaults, not when the help already says.
    A flag without a help text gets its default as its help."""

    @staticmethod
    def _informs(action: argparse.Action) -> bool:
        return not (action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0
                    or not action.option_strings)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if not self._informs(action) or "default" in help_:
            return help_
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._informs(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with DefaultsHelpFormatter, and errors in one line with a pointer to --help."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
