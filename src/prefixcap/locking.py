"""One writer per output folder: an exclusive `flock` held by the live process, freed by the kernel on death.

`train`, `preprocess` and `caption` take this lock on what they write into. A second command
pointed at the same folder (or file) is refused with a message naming the holder's PID. The
lock is the kernel's, not a file's presence: `kill -9` of the holder frees it at once, and a
stale lock file left behind never blocks anyone. The file is kept (unlinking it would let two
processes lock two different inodes of the same name); it only carries the holder's PID for the
message.

Processes forked by the holder (DataLoader or decoding workers) share the open file, so the lock
is free only once they have exited too: a folder stays locked while anything of the run can still
write into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from prefixcap.errors import PrefixcapError

LOCK_NAME = ".prefixcap.lock"


class OutputLockedError(PrefixcapError, RuntimeError):
    """Another live process holds the output's lock; the message names its PID."""


def lock_path(target: str | Path, kind: str = "folder", rank: int = 0) -> Path:
    """The lock file of an output folder (`{folder}/.prefixcap.lock`) or file (`{dir}/.{name}.lock`).

    Rank r > 0 of a multi-process run locks `.prefixcap.rank{r}.lock`: the ranks of one run write
    the same folder together, while the same rank of a second run is refused.
    """
    target = Path(target)
    if kind == "file":
        return target.parent / f".{target.name}.lock"
    return target / (LOCK_NAME if rank == 0 else f".prefixcap.rank{rank}.lock")


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "an unknown process"
    return text or "an unknown process"


@contextlib.contextmanager
def output_lock(target: str | Path, command: str, kind: str = "folder", rank: int = 0,
                flag: str = "--output_dir") -> Iterator[Path]:
    """Hold an exclusive lock on an output folder (or file) for the body; refuse if another process holds it."""
    path = lock_path(target, kind, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            what = "file" if kind == "file" else "folder"
            raise OutputLockedError(
                f"{flag} {target}: this {what} is being written by another process ({_holder(path)}); "
                f"wait for it to finish or stop it, or write elsewhere (lock file {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"PID {os.getpid()}: {command} on {socket.gethostname()}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the lock (the kernel does it on death)
