"""Ctrl-C and SIGTERM as a stop request, honoured at the next safe point; a second one stops at once.

Python's default SIGINT handler raises KeyboardInterrupt wherever the interpreter happens to be.
When that is inside a finalizer (a `__del__`, a weakref callback), Python prints "Exception
ignored in ..." and the run goes on: the Ctrl-C is lost. So a long command runs inside
`stop_requests()`, whose handler only records the request; the command's loops call `check()` at
their safe points (after a training step and its save, after a preprocess batch, after a caption
batch), which raises `Interrupted`, a KeyboardInterrupt, where the code expects one. A second
signal raises KeyboardInterrupt at once (should that land in a finalizer too, the recorded
request still stops the command at the next safe point). The commands report an interruption as
before: their message and exit status 130, for SIGTERM as for SIGINT.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: list[int] = []  # the signals received since stop_requests() was entered
_owner: list[int] = []  # the PID of the process that entered stop_requests()


class Interrupted(KeyboardInterrupt):
    """A stop asked for with Ctrl-C or SIGTERM, raised at a safe point."""


def _on_signal(signum: int, frame: object) -> None:
    if _owner and os.getpid() != _owner[0]:
        # A forked worker (preprocess pool, DataLoader) inherited this handler: it must die of SIGTERM as
        # its pool expects (pool.terminate() waits for that), and take SIGINT as Python always does.
        if signum != signal.SIGTERM:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    first = not _requested
    _requested.append(signum)
    if not first:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now


def requested() -> bool:
    """Whether a stop was asked for (the loops that cannot raise may poll this instead)."""
    return bool(_requested)


def check() -> None:
    """Raise Interrupted if a stop was asked for: call it where stopping leaves everything consistent."""
    if _requested:
        raise Interrupted(signal.Signals(_requested[0]).name)


@contextlib.contextmanager
def stop_requests() -> Iterator[None]:
    """Within this block SIGINT/SIGTERM request a stop instead of raising wherever Python is.

    Outside the main thread (signal handlers can only be set there) it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _requested.clear()
    _owner[:] = [os.getpid()]
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        yield
        check()  # a request that came after the last safe point still ends the command as interrupted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        _requested.clear()
        _owner.clear()
