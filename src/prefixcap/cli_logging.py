"""While a command runs, show the library's warnings on stderr as the plain one-line messages they are.

Library modules log (`logging.getLogger(__name__)`, messages already prefixed with the command,
e.g. "prefixcap train: notice: ..."); a CLI wraps its work in `library_messages_on_stderr()` so the
user sees exactly those lines, without logger names or levels, and a program that imports the
library keeps full control of where its records go.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (a redirect or a test's capture may replace it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass  # StreamHandler.__init__ assigns one; the current sys.stderr is always used instead


@contextlib.contextmanager
def library_messages_on_stderr(level: int = logging.WARNING) -> Iterator[None]:
    """Print the `prefixcap` loggers' records of `level` and above as bare messages on stderr."""
    logger = logging.getLogger("prefixcap")
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    propagate = logger.propagate
    logger.addHandler(handler)
    # The command owns its output: without this a root handler (basicConfig) would print each line twice.
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
