"""Preprocess resume bookkeeping: shard names, what each rank has done, the folder's settings and the manifest.

Work is split into units (one tar, one embeddings file, or a chunk of listed images); rank r of W
takes units u with u % W == r. A shard is named after its unit and part (u000012-p0003), so the
names sort into input order whatever the number of ranks. A shard is complete when its stats json
exists (written last); on a rerun, complete parts are skipped and the records they consumed are
skipped in the input, so nothing is duplicated or lost. Each rank marks itself done in progress/;
the manifest is written by whichever rank finds all ranks done.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from prefixcap.data.shards import (
    FORMAT_VERSION, SETTINGS, SHARD_DIR, Manifest, ShardEntry, completed_shards, shard_keys,
)
from prefixcap.data.decode import NOT_SAMPLE_REASONS
from prefixcap.runs import atomic_write_json, check_recorded_settings, finish_when_all_done

PROGRESS_DIR = "progress"



class NoUsableSamplesError(RuntimeError):
    """Every input sample was skipped: no dataset is declared complete; the message says what was
    looked for and what the input holds."""


@dataclass
class PreprocessSummary:
    """Counts of one run (this rank) and the manifest when the dataset is complete."""

    num_images: int = 0
    num_captions: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    num_truncated: int = 0
    seconds: float = 0.0
    shards_written: int = 0
    manifest: Manifest | None = None


def shard_name(unit: int, part: int) -> str:
    return f"u{unit:06d}-p{part:04d}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    if len(name) == 13 and name[0] == "u" and name[7:9] == "-p":
        try:
            return int(name[1:7]), int(name[9:])
        except ValueError:
            return None
    return None


def check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Write settings.json on the first run; refuse a rerun into the same folder with other settings."""
    path = folder / SETTINGS
    refusal = (lambda differences: f"{folder} was preprocessed with other settings ({differences}); rerun with "
               "the original settings to resume, add --overwrite to start the folder afresh, or use another "
               "--output_folder")
    if not check_recorded_settings(path, settings, refusal):
        atomic_write_json(path, settings)


# ---------------------------------------------------------------- what is done

def unit_progress(done: dict[str, dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """unit -> stats of its complete parts, in part order (only the contiguous prefix counts)."""
    by_unit: dict[int, dict[int, dict[str, Any]]] = {}
    for name, stats in done.items():
        parsed = parse_shard_name(name)
        if parsed:
            by_unit.setdefault(parsed[0], {})[parsed[1]] = stats
    out = {}
    for unit, parts in by_unit.items():
        seq = []
        while len(seq) in parts:
            seq.append(parts[len(seq)])
        out[unit] = seq
    return out


class PlannedUnit(NamedTuple):
    """A unit this rank has still to finish."""

    unit: int
    first_part: int  # the first part not complete yet
    skip: int  # input records its complete parts consumed


@dataclass
class RankPlan:
    """What is left for one rank, and how far its complete parts got."""

    units: list[PlannedUnit]
    consumed: int  # input records this rank's complete parts consumed
    subset_done: bool  # a complete part already reached --subset_size


def plan_rank(folder: Path, rank: int, world_size: int, num_units: int) -> RankPlan:
    """The units of this rank that are not complete, from the complete shards in folder."""
    progress = unit_progress(completed_shards(folder))
    plan = RankPlan([], 0, False)
    for unit in range(rank, num_units, world_size):
        parts = progress.get(unit, [])
        plan.consumed += sum(p.get("records", 0) for p in parts)
        if any(p.get("subset_stop") for p in parts):
            plan.subset_done = True
        if parts and parts[-1].get("last"):
            continue
        plan.units.append(PlannedUnit(unit, len(parts), sum(p.get("records", 0) for p in parts)))
    return plan


def consumed_keys(folder: Path, units: set[int]) -> set[int]:
    """64-bit hashes of the sample keys the complete parts of these units consumed (stored or skipped), so
    a resumed run skips the same duplicates."""
    seen: set[int] = set()
    for name, stats in completed_shards(folder).items():
        parsed = parse_shard_name(name)
        if not parsed or parsed[0] not in units:
            continue
        seen.update(hash(k) for k in shard_keys(folder, name))
        seen.update(hash(k) for k, reason in stats.get("skipped_keys", []) if reason not in NOT_SAMPLE_REASONS)
    return seen


def remove_stale_temporaries(folder: Path, units: set[int]) -> None:
    """Temporary shard files of these units left by a killed run (never read; the part is redone)."""
    shard_dir = folder / SHARD_DIR
    if not shard_dir.is_dir():
        return
    for tmp in shard_dir.glob(".u*.tmp"):
        parsed = parse_shard_name(tmp.name[1:14])
        if parsed and parsed[0] in units:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- ranks done, manifest

def rank_marker(folder: Path, rank: int, world: int) -> Path:
    return folder / PROGRESS_DIR / f"rank{rank:03d}-of-{world:03d}.done.json"


def mark_rank_done(folder: Path, rank: int, world_size: int) -> None:
    atomic_write_json(rank_marker(folder, rank, world_size), {"rank": rank, "world_size": world_size,
                                                              "time": time.time()})


def rank_done(folder: Path, rank: int, world_size: int) -> bool:
    return rank_marker(folder, rank, world_size).exists()


def try_write_manifest(folder: Path, world_size: int, header: Manifest) -> Manifest | None:
    """Write manifest.json when every rank has finished; returns it (or None if some rank is still running)."""
    markers = [rank_marker(folder, r, world_size) for r in range(world_size)]
    return finish_when_all_done(markers, lambda: _write_manifest(folder, world_size, header))


def _write_manifest(folder: Path, world_size: int, header: Manifest) -> Manifest:
    """The header completed with the counts of every complete shard, written."""
    skipped: Counter = Counter()
    converted: Counter = Counter()
    shards, num_captions, num_truncated, unit_norm = [], 0, 0, True
    records, layout = 0, None
    for name, stats in completed_shards(folder).items():
        if not parse_shard_name(name):
            continue
        records += stats.get("records", 0)
        layout = layout or stats.get("input_layout")
        skipped.update(stats.get("skipped", {}))
        converted.update(stats.get("converted", {}))
        num_truncated += stats.get("num_truncated", 0)
        unit_norm &= bool(stats.get("unit_norm", False))
        if stats["num_images"]:
            shards.append(ShardEntry(name, stats["num_images"], stats["num_captions"]))
            num_captions += stats["num_captions"]
    num_images = sum(s.num_images for s in shards)
    if num_images == 0:
        raise NoUsableSamplesError(_no_samples_message(folder, records, skipped, layout))
    manifest = replace(
        header,
        # clip-retrieval embeddings are usually unit-norm already; the shards' stats say whether all were.
        normalized=header.normalized or (header.input_format == "embeddings" and unit_norm),
        num_images=num_images, num_captions=num_captions, num_skipped=sum(skipped.values()),
        skipped=dict(sorted(skipped.items())), converted=dict(sorted(converted.items())),
        num_truncated=num_truncated, shards=shards, format_version=FORMAT_VERSION, world_size=world_size,
    )
    manifest.write(folder)
    return manifest


def _no_samples_message(folder: Path, records: int, skipped: Counter, layout: str | None) -> str:
    from prefixcap.data.decode import SKIP_REASONS

    reasons = ", ".join(f"{r}: {n} ({SKIP_REASONS.get(r, r)})" for r, n in skipped.most_common())
    message = (f"no usable sample: all {records} input samples were skipped" + (f" ({reasons})" if reasons else "")
               + (f"; {layout}" if layout else ""))
    return (message + f". {folder} is not a dataset (no manifest.json was written); fix the flags and rerun "
            "with --overwrite")
