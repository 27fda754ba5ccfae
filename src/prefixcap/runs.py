"""Resumable sharded runs (preprocess, re-captioning): ranks, folder settings, finishing, atomic writes.

Both stages write an output folder that several ranks (torchrun / accelerate launch) fill together and
that a rerun resumes; the rules they share live here:
  ranks      rank r of W from RANK / WORLD_SIZE takes the units u with u % W == r
  settings   the folder records the settings it was started with; a rerun that asks for others is
             refused, naming each differing key
  finishing  a file written last marks each piece done (img2dataset's rule); whichever rank finds
             every piece done writes the folder's result (manifest, summary)
  atomic     every file is written to a hidden temporary name and renamed into place, so readers and
             resumes see either the old file or the complete new one
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from prefixcap.errors import UsageError

T = TypeVar("T")


# ---------------------------------------------------------------- ranks

def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torchrun / accelerate launch / plain RANK and WORLD_SIZE variables."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UsageError("RANK and WORLD_SIZE in the environment must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"invalid RANK={rank} / WORLD_SIZE={world} in the environment")
    return rank, world


def is_main_process() -> bool:
    """True for rank 0 and for a process no launcher started (no RANK variable)."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- folder settings

class SettingsMismatchError(UsageError):
    """An output folder was started with other settings; the message names each differing key."""


def flatten_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"reader": {"wds_caption_key": ...}} -> {"wds_caption_key": ...}: a mismatch names the flag itself
    (a nested key that collides with an outer one keeps its path)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key != "generate_kwargs":  # passed to generate verbatim: one value
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[key if key not in flat else f"{prefix}{key}"] = value
    return flat


def settings_differences(old: dict[str, Any], new: dict[str, Any], ignore: set[str] = frozenset()) -> str | None:
    """"key: folder has A, this run asks for B; ..." for every differing (flattened) key, or None."""
    old, new = flatten_settings(old), flatten_settings(new)
    diff = sorted(k for k in (set(old) | set(new)) - set(ignore) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: folder has {old.get(k)!r}, this run asks for {new.get(k)!r}" for k in diff) or None


def check_recorded_settings(path: Path, settings: dict[str, Any], refusal: Callable[[str], str],
                            ignore: Callable[[dict[str, Any]], set[str]] = lambda recorded: set()) -> bool:
    """Refuse a run whose settings differ from those recorded at `path`: SettingsMismatchError with
    refusal(differences). `ignore(recorded)` names keys not to compare. Returns whether settings were
    recorded (False: a new folder, which passes; the caller records them when it is ready to)."""
    if not path.exists():
        return False
    recorded = json.loads(path.read_text())
    differences = settings_differences(recorded, settings, ignore(recorded))
    if differences:
        raise SettingsMismatchError(refusal(differences))
    return True


# ---------------------------------------------------------------- finishing

def finish_when_all_done(markers: Iterable[Path], write: Callable[[], T], *, result: Path | None = None,
                         read: Callable[[Path], T] | None = None) -> T | None:
    """The folder's result once every piece is done, else None (some rank is still running).

    `markers` are the files written last by each rank or shard; when all exist, the result already
    at `result` is returned as `read` reads it (a rerun of a finished folder keeps it), or else
    `write()` assembles it from the pieces, writes it atomically and returns it. Ranks that finish at
    once may both write it: the content is the same and the rename atomic.
    """
    if not all(Path(m).exists() for m in markers):
        return None
    if result is not None and read is not None and result.exists():
        return read(result)
    return write()


# ---------------------------------------------------------------- atomic writes

def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set back at once
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import, before any worker thread exists


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; a dataset is meant to be read by others, as with open().
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys (stable diffs), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
