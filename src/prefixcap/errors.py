"""The one exception hierarchy of prefixcap and the exit-code convention every command follows.

Every error prefixcap raises on purpose derives from `PrefixcapError`, so a caller (or the CLI)
can catch all of them at once. The CLI maps them to exit codes:
  2  `UsageError`: the command was asked for something it cannot do as written (a flag, a path,
     a config, an input format): fixing the command line fixes it;
  1  any other `PrefixcapError`: the run started and failed (a model that does not load, no usable
     sample, a locked output folder, ...);
  130 interrupted with Ctrl-C.
`UsageError` also derives from ValueError because most of them are argument-validation errors and
existing callers catch ValueError.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class PrefixcapError(Exception):
    """Base class of every error prefixcap raises on purpose; its message is meant for people."""

    exit_code = EXIT_RUNTIME


class UsageError(PrefixcapError, ValueError):
    """A wrong flag, path, configuration or input format: the command line has to change."""

    exit_code = EXIT_USAGE


def exit_code_for(error: BaseException) -> int:
    """The CLI exit code for an exception that reached the command's top level."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, PrefixcapError):
        return error.exit_code
    return EXIT_RUNTIME


def first_line(err: BaseException) -> str:
    """An exception's first message line (its type name when it has none), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
