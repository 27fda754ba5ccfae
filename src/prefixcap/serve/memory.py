"""Giving freed memory back to the OS after large request bodies (glibc malloc; a no-op elsewhere).

Why: glibc keeps freed heap memory for reuse. After a burst of 19 MB uploads (each parsed into
strings, bytes and images several times its size) the process stays at its peak RSS although
Python freed everything, so a server's memory only ever grows. Two glibc knobs fix it:
`mallopt(M_MMAP_THRESHOLD)` makes every allocation above 1 MB its own mapping, returned to the
OS on free (glibc otherwise raises that threshold to the largest block freed so far, up to
32 MB, i.e. exactly the sizes of uploads); and `malloc_trim(0)` hands back free pages of the
heaps, run by a background thread shortly after a large request finished.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_AFTER_BYTES = 1 << 20  # requests with bodies at least this large schedule a trim
TRIM_DELAY_S = 0.5  # trims come at most this often, shortly after the last large request


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only; musl and macOS have none
        libc.mallopt  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def tune_malloc() -> bool:
    """Process-wide, once at server start: large blocks as their own mappings. True if applied."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class MemoryTrimmer:
    """Call with a finished request's body size; after large ones a background thread runs
    malloc_trim at most every TRIM_DELAY_S (never on the event loop: it can take milliseconds)."""

    def __init__(self, min_bytes: int = TRIM_AFTER_BYTES, delay_s: float = TRIM_DELAY_S):
        self.min_bytes, self.delay_s = min_bytes, delay_s
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self.trims = 0

    def __call__(self, nbytes: int) -> None:
        if _LIBC is None or nbytes < self.min_bytes:
            return
        self._wanted.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefixcap-malloc-trim", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            time.sleep(self.delay_s)  # let the burst's last requests finish freeing first
            self._wanted.clear()
            trim()
            self.trims += 1
