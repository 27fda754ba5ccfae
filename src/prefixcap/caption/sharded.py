"""`prefixcap caption --output_dir`: one output shard per input shard, written atomically, resumable, split over ranks.

Layout of an output folder:
  {name}.{jsonl|parquet|tar}   one per input shard (named after it), renamed into place when complete
  {name}_stats.json            written after its shard: a shard is finished exactly when this exists
                               (img2dataset's rule); counts, errors per reason, the keys that failed
  caption_settings.json        model and settings of the folder, written first; a rerun with others is refused
  caption_summary.json         settings + counts + errors per reason; written by the rank that finds
                               every shard finished
A rerun skips finished shards and redoes the others from their start (a temporary file of a killed
run is deleted, never read). Under torchrun / accelerate launch (WORLD_SIZE > 1) rank r of W takes
input shards u with u % W == r, as `prefixcap preprocess` does; each rank holds its own lock.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefixcap.caption.inputs import CaptionInputError, CaptionInputs, InputUnit, input_units
from prefixcap.caption.writers import EXTENSIONS, ShardWriter, WriterOptions, make_writer, reason_of
from prefixcap.caption.pipeline import Item, PipelineOptions, Result, caption_batches
from prefixcap.errors import UsageError
from prefixcap.runs import atomic_write_json, check_recorded_settings, finish_when_all_done, rank_and_world

if TYPE_CHECKING:
    from prefixcap.caption.captioner import Captioner

PROG = "prefixcap caption"
SETTINGS_FILE = "caption_settings.json"
SUMMARY_FILE = "caption_summary.json"
STATS_SUFFIX = "_stats.json"
FORMAT_VERSION = 1
MAX_ERROR_KEYS = 10_000  # failed keys listed per shard; the counts are always complete
HASHED_FILE_BYTES = 16 << 20  # model files up to this size are hashed whole; larger ones by name and size


@dataclass
class ShardOutputOptions:
    """Where and how `caption --output_dir` writes its shards."""

    output_dir: str
    output_format: str = "jsonl"
    copy_members: bool = False
    caption_member: str = "prefixcap.txt"
    overwrite: bool = False


@dataclass
class RecaptionSummary:
    """What this rank did, and the folder's summary when every shard is finished."""

    rank: int = 0
    world_size: int = 1
    shards_total: int = 0
    shards_done_before: int = 0
    shards_written: int = 0
    items: int = 0
    captioned: int = 0
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    summary: dict[str, Any] | None = None

    @property
    def captions_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


@dataclass
class PlannedShard:
    index: int  # the input shard's position among all input shards
    unit: InputUnit
    name: str  # output shard name, without extension


def shard_names(units: list[InputUnit]) -> list[str]:
    """Output shard names: each input shard's file stem (00012.tar -> 00012), made unique by its index if need be."""
    stems = []
    for unit in units:
        base = unit.name.rstrip("/").rsplit("/", 1)[-1]
        for ext in (".tar.gz", ".tar", ".parquet", ".jsonl", ".json", ".csv", ".tsv", ".npy"):
            if base.lower().endswith(ext) and len(base) > len(ext):
                base = base[: -len(ext)]
                break
        stems.append("".join(c if c.isalnum() or c in "-_." else "_" for c in base).lstrip(".") or "shard")
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:05d}_{stem}" for i, stem in enumerate(stems)]


def model_fingerprint(model: str) -> str | None:
    """sha256 of a local model folder (small files whole, large ones by name and size); None for a Hub id."""
    root = Path(model)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
        if size <= HASHED_FILE_BYTES:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse a run into a folder started with other settings, naming each differing key (a new folder passes)."""
    def ignore(recorded: dict[str, Any]) -> set[str]:
        # The same model files under another path (a moved or re-downloaded folder) are the same model.
        same_model = recorded.get("model_sha256") and recorded.get("model_sha256") == settings.get("model_sha256")
        return {"model"} if same_model else set()

    check_recorded_settings(
        folder / SETTINGS_FILE, settings, ignore=ignore,
        refusal=lambda differences: f"--output_dir {folder} was captioned with other settings ({differences}); "
        "rerun with the original settings to resume, add --overwrite to start afresh, or use another --output_dir")


def stats_path(folder: Path, name: str) -> Path:
    return folder / f"{name}{STATS_SUFFIX}"


def clear_outputs(folder: Path, names: list[str]) -> int:
    """--overwrite: delete what caption wrote into folder (shards of these or earlier runs, stats, settings,
    summary, temporary files); never other files. Returns the number of files deleted."""
    targets = {folder / SETTINGS_FILE, folder / SUMMARY_FILE}
    previous = [p.name[: -len(STATS_SUFFIX)] for p in folder.glob(f"*{STATS_SUFFIX}")]
    for name in set(names) | set(previous):
        targets.add(stats_path(folder, name))
        targets.update(folder / f"{name}{ext}" for ext in EXTENSIONS.values())
        targets.update(folder.glob(f".{name}.*.tmp"))
    removed = 0
    for path in targets:
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def remove_temporaries(folder: Path, names: list[str]) -> None:
    """Temporary files of these shards left by a killed run (never read; the shard is redone)."""
    for name in names:
        for ext in EXTENSIONS.values():
            for tmp in folder.glob(f".{name}{ext}.*.tmp"):
                tmp.unlink(missing_ok=True)


def try_write_summary(folder: Path, shards: list[PlannedShard], settings: dict[str, Any],
                      world_size: int) -> dict[str, Any] | None:
    """Write caption_summary.json when every shard has its stats; returns it (None while some are unfinished).
    A rerun of a finished folder (same settings: checked) keeps the summary it has."""
    paths = [stats_path(folder, s.name) for s in shards]
    return finish_when_all_done(paths, lambda: _write_summary(folder, paths, settings, world_size),
                                result=folder / SUMMARY_FILE, read=lambda path: json.loads(path.read_text()))


def _write_summary(folder: Path, paths: list[Path], settings: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The settings with the counts of every shard's stats, written as caption_summary.json."""
    errors: Counter = Counter()
    rows, items, captioned = [], 0, 0
    for path in paths:
        stats = json.loads(path.read_text())
        errors.update(stats["errors"])
        items += stats["items"]
        captioned += stats["captioned"]
        rows.append({k: stats[k] for k in ("name", "input", "output", "items", "captioned", "num_errors")})
    from prefixcap import __version__

    summary = {**settings, "num_shards": len(paths), "items": items, "captioned": captioned,
               "num_errors": sum(errors.values()), "errors": dict(sorted(errors.items())), "shards": rows,
               "world_size": world_size, "created_by": f"prefixcap {__version__} caption",
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(folder / SUMMARY_FILE, summary)
    return summary


# --------------------------------------------------------------------------- shards in flight
@dataclass
class _OpenShard:
    shard: PlannedShard
    writer: ShardWriter
    started: float
    expected: int | None = None  # items the input shard held; known once it has been read to its end
    received: int = 0
    captioned: int = 0
    errors: Counter = field(default_factory=Counter)
    error_keys: list[list[str]] = field(default_factory=list)


class ShardTracker:
    """Routes results (in input order) to their shard's writer and finishes each shard once all its results are in."""

    def __init__(self, folder: Path, writer_options: WriterOptions, rank: int, world_size: int,
                 summary: RecaptionSummary):
        self.folder = folder
        self.writer_options = writer_options
        self.rank, self.world_size = rank, world_size
        self.summary = summary
        self.open: deque[_OpenShard] = deque()
        self.by_index: dict[int, _OpenShard] = {}

    def items(self, shards: list[PlannedShard]) -> Iterator[Item]:
        """Every item of the shards, in order, each tagged with its shard; a shard's writer opens as it starts."""
        for shard in shards:
            writer = make_writer(self.folder, shard.name, self.writer_options, shard.unit.name)
            entry = _OpenShard(shard, writer, time.perf_counter())
            self.open.append(entry)
            self.by_index[shard.index] = entry
            n = 0
            for item in shard.unit.items():
                item.meta = shard.index
                n += 1
                yield item
            entry.expected = n

    def add(self, results: list[Result]) -> None:
        for result in results:
            entry = self.by_index[result.item.meta]
            entry.received += 1
            if result.error is None:
                entry.captioned += 1
            else:
                entry.errors[reason_of(result.error)] += 1
                if len(entry.error_keys) < MAX_ERROR_KEYS:
                    entry.error_keys.append([result.key, result.error])
        for entry in {id(e): e for e in (self.by_index[r.item.meta] for r in results)}.values():
            entry.writer.write([r for r in results if r.item.meta == entry.shard.index])
        self.finish_ready()

    def finish_ready(self) -> None:
        while self.open and self.open[0].expected is not None and self.open[0].received == self.open[0].expected:
            self._finish(self.open.popleft())

    def _finish(self, entry: _OpenShard) -> None:
        entry.writer.close(True)
        ext = EXTENSIONS[self.writer_options.output_format]
        stats = {"name": entry.shard.name, "input": entry.shard.unit.name, "output": f"{entry.shard.name}{ext}",
                 "output_format": self.writer_options.output_format, "rank": self.rank,
                 "world_size": self.world_size, "items": entry.received, "captioned": entry.captioned,
                 "num_errors": sum(entry.errors.values()), "errors": dict(sorted(entry.errors.items())),
                 "error_keys": entry.error_keys, "seconds": round(time.perf_counter() - entry.started, 3)}
        atomic_write_json(stats_path(self.folder, entry.shard.name), stats)  # last: the shard is finished
        del self.by_index[entry.shard.index]
        s = self.summary
        s.shards_written += 1
        s.items += entry.received
        s.captioned += entry.captioned
        s.errors.update(entry.errors)

    def abort(self) -> None:
        """Delete the temporary files of the shards still open (a rerun redoes them)."""
        while self.open:
            entry = self.open.popleft()
            try:
                entry.writer.close(False)
            except Exception:  # noqa: BLE001 - the next shard's file still has to go
                pass


# --------------------------------------------------------------------------- the run
@dataclass
class RecaptionPlan:
    """Everything decided before the model loads: shards, names, settings, rank."""

    shards: list[PlannedShard]
    settings: dict[str, Any]
    rank: int
    world_size: int


def make_plan(inputs: CaptionInputs, out: ShardOutputOptions, settings: dict[str, Any]) -> RecaptionPlan:
    """List the input shards (a bad input raises CaptionInputError) and complete the folder's settings."""
    rank, world = rank_and_world()
    if out.overwrite and world > 1:
        raise UsageError("--overwrite deletes what the other ranks are writing: run it once without a launcher "
                         "(or delete the folder), then launch the ranks without --overwrite")
    units = list(input_units(inputs))
    if not units:
        raise CaptionInputError("no input shards found")
    names = shard_names(units)
    shards = [PlannedShard(i, u, n) for i, (u, n) in enumerate(zip(units, names))]
    settings = {**settings, "format_version": FORMAT_VERSION, "output_format": out.output_format,
                "input_format": inputs.input_format, "num_input_shards": len(units),
                "input_shards_sha256": hashlib.sha256("\n".join(u.name for u in units).encode()).hexdigest(),
                "reader": {k: v for k, v in asdict(inputs.reader).items() if k != "cache_path"}}
    if out.output_format == "webdataset":
        settings.update(copy_members=out.copy_members, caption_member=out.caption_member)
    return RecaptionPlan(shards, settings, rank, world)


def run_recaption(plan: RecaptionPlan, out: ShardOutputOptions, load: Callable[[], Captioner],
                  options: PipelineOptions, writer_options: WriterOptions, progress: bool = True) -> RecaptionSummary:
    """This rank's unfinished shards, captioned into out.output_dir; `load` is called only when there is work."""
    from prefixcap.locking import output_lock

    folder = Path(out.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    summary = RecaptionSummary(plan.rank, plan.world_size, len(plan.shards))
    # Each rank locks its own file: the ranks of one run share the folder, a second run's same rank is refused.
    with output_lock(folder, PROG, rank=plan.rank, flag="--output_dir"):
        if out.overwrite and clear_outputs(folder, [s.name for s in plan.shards]):
            print(f"{PROG}: --overwrite: deleted the previous captions in {folder}", flush=True)
        check_settings(folder, plan.settings)
        mine = [s for s in plan.shards if s.index % plan.world_size == plan.rank]
        todo = [s for s in mine if not stats_path(folder, s.name).exists()]
        summary.shards_done_before = len(mine) - len(todo)
        if todo:
            remove_temporaries(folder, [s.name for s in todo])
            (folder / SUMMARY_FILE).unlink(missing_ok=True)  # shards are being redone: its counts would be stale
            cap = load()
            if not (folder / SETTINGS_FILE).exists():  # only now: a run that failed to start leaves no settings
                atomic_write_json(folder / SETTINGS_FILE, plan.settings)
            _caption_shards(cap, todo, folder, options, writer_options, summary, progress)
        summary.summary = try_write_summary(folder, plan.shards, plan.settings, plan.world_size)
    return summary


def _caption_shards(cap: Captioner, todo: list[PlannedShard], folder: Path, options: PipelineOptions,
                    writer_options: WriterOptions, summary: RecaptionSummary, progress: bool) -> None:
    from tqdm import tqdm

    tracker = ShardTracker(folder, writer_options, summary.rank, summary.world_size, summary)
    sizes = [s.unit.size for s in todo]
    total = None if any(n is None for n in sizes) else sum(sizes)
    desc = f"captioning rank {summary.rank}" if summary.world_size > 1 else "captioning"
    bar = tqdm(total=total, unit="caption", desc=desc, disable=not progress, dynamic_ncols=True, smoothing=0.1)
    start = time.perf_counter()
    try:
        for results in caption_batches(cap, tracker.items(todo), options):
            tracker.add(results)
            bar.update(len(results))
            bar.set_postfix(shards=summary.shards_written, errors=sum(tracker_errors(tracker, summary).values()),
                            refresh=False)
        tracker.finish_ready()
        if tracker.open:  # every item was routed, so every shard must be complete here
            raise RuntimeError(f"shard {tracker.open[0].shard.name} ended with "
                               f"{tracker.open[0].received} of {tracker.open[0].expected} results")
    except BaseException:
        tracker.abort()
        raise
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start


def tracker_errors(tracker: ShardTracker, summary: RecaptionSummary) -> Counter:
    """Errors so far: finished shards' plus those of shards still open."""
    out = Counter(summary.errors)
    for entry in tracker.open:
        out.update(entry.errors)
    return out
