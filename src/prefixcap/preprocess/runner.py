"""The preprocess runner: worker processes decode, the main process encodes in batches and writes resumable shards.

Pipeline (one process per rank):
  producer thread   reads records of this rank's units in order, groups them into batches and hands
                    chunks of each batch to a pool of worker processes
  worker processes  read/decode/convert each image, apply the encoder's resize+crop and write uint8
                    pixels straight into a shared-memory batch slot; tokenize the captions
  main thread       waits for batches in order, normalises + encodes them on the device under
                    torch.inference_mode, and writes a shard every --samples_per_shard input records

Work is split into units (one tar, one embeddings file, or a chunk of listed images); rank r of W
takes units u with u % W == r. A shard is named after its unit and part (u000012-p0003), so the
names sort into input order whatever the number of ranks. A shard is complete when its stats json
exists (written last); on a rerun, complete parts are skipped and the records they consumed are
skipped in the input, so nothing is duplicated or lost. The manifest is written by whichever rank
finds all ranks done.
"""

from __future__ import annotations

import ctypes
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from prefixcap.data.decode import decode_caption
from prefixcap.data.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image, raise_pil_limit
from prefixcap.data.readers import Reader, Record
from prefixcap.data.shards import (
    FORMAT_VERSION, MANIFEST, SETTINGS, SHARD_DIR, Manifest, SettingsMismatchError, ShardContent, ShardEntry,
    atomic_write_json, completed_shards, settings_differences, write_shard,
)
from prefixcap.model.language_models import tokenize_caption

PROGRESS_DIR = "progress"
MAX_SKIPPED_KEYS_PER_SHARD = 10000
MAX_CHARS_PER_TOKEN = 64  # captions are cut to max_token_length * this many characters before tokenizing


class NoUsableSamplesError(RuntimeError):
    """Every input sample was skipped: no dataset is declared complete; the message says what was
    looked for and what the input holds."""


# Records that stand for a tar member or a tar, not a sample: their key is not a sample key.
_NOT_SAMPLE_REASONS = ("duplicate_member", "truncated_tar")


@dataclass
class RunConfig:
    """How the runner works; the what (encoder, tokenizer, input) comes in as objects."""

    output_folder: str
    batch_size: int = 256
    num_prepro_workers: int = 8
    samples_per_shard: int = 10000
    subset_size: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    jpeg_draft: bool = False
    rank: int = 0
    world_size: int = 1
    log_skipped: int = 20  # print this many skipped keys; all are kept in the shard stats
    progress: bool = True
    patch_pool: int | None = None  # store the encoder's patch tokens, P x P pooled (None: pooled vector only)


def shard_name(unit: int, part: int) -> str:
    return f"u{unit:06d}-p{part:04d}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    if len(name) == 13 and name[0] == "u" and name[7:9] == "-p":
        try:
            return int(name[1:7]), int(name[9:])
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------- pixels: worker part + device part

@dataclass
class PixelPipeline:
    """The encoder's preprocessing split in two: resize/crop in workers, normalisation on the device."""

    worker_fn: Callable[[Any], np.ndarray]  # PIL RGB -> (3, H, W) array of `dtype`
    device_fn: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) worker output -> encoder input
    shape: tuple[int, int, int]
    dtype: np.dtype


class _ResizeCrop:
    """Picklable: the encoder's HFPreprocessor with rescale/normalise switched off -> uint8 (3, H, W)."""

    def __init__(self, full: Any):
        self.full = full

    def __call__(self, image: Any) -> np.ndarray:
        # full.fit crops an extreme aspect ratio first, exactly as the full preprocessor does.
        out = self.full.processor(images=self.full.fit(image), do_rescale=False, do_normalize=False,
                                  return_tensors="np")
        return np.clip(np.rint(np.asarray(out["pixel_values"][0], dtype=np.float32)), 0, 255).astype(np.uint8)


class _DeviceNormalize:
    """x * rescale_factor, then (x - mean) / std per channel; cheap on the device, 4x less IPC than floats."""

    def __init__(self, scale: float, mean: list[float], std: list[float]):
        self.scale = scale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        x = pixels.to(device or pixels.device, non_blocking=True).float() * self.scale  # (B, 3, H, W)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def make_pixel_pipeline(encoder: Any) -> PixelPipeline:
    """Use the uint8 fast path when the encoder's own processor can be split exactly; else ship floats."""
    from PIL import Image

    full = encoder.preprocessor()
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 83, 3), dtype=np.uint8))
    reference = np.asarray(full(probe), dtype=np.float32)  # (3, H, W)
    processor = getattr(full, "processor", None)
    if processor is not None and all(hasattr(processor, a) for a in ("image_mean", "image_std", "rescale_factor")):
        try:
            worker_fn = _ResizeCrop(full)
            norm = _DeviceNormalize(float(processor.rescale_factor) if processor.do_rescale else 1.0,
                                    list(processor.image_mean) if processor.do_normalize else [0.0] * 3,
                                    list(processor.image_std) if processor.do_normalize else [1.0] * 3)
            fast = norm(torch.from_numpy(worker_fn(probe))[None])[0].numpy()
            if fast.shape == reference.shape and np.allclose(fast, reference, atol=1e-4):
                return PixelPipeline(worker_fn, norm, tuple(reference.shape), np.dtype(np.uint8))
        except Exception:  # noqa: BLE001 - any processor quirk: fall back to the exact float path
            pass
    return PixelPipeline(full, lambda x, device=None: x, tuple(reference.shape), np.dtype(np.float32))


# ---------------------------------------------------------------- worker processes

@dataclass
class _WorkerSetup:
    pixel_fn: Callable[[Any], np.ndarray] | None
    buffers: np.ndarray | None  # (slots, batch, 3, H, W) shared with the main process, or None
    tokenizer: Any
    family: str
    max_token_length: int
    max_pixels: int
    draft_size: int | None


@dataclass
class ItemResult:
    """What a worker reports for one record (pixels go to the shared slot when there is one)."""

    key: str
    reason: str | None
    conversions: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    num_truncated: int = 0
    caption_skips: int = 0
    pixels: np.ndarray | None = None  # only when there is no shared buffer
    embedding: np.ndarray | None = None  # precomputed embeddings input


_SETUP: _WorkerSetup | None = None


def _worker_init(setup: _WorkerSetup) -> None:
    global _SETUP
    _SETUP = setup
    raise_pil_limit(setup.max_pixels)  # spawned workers start with PIL's default
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    if sys.platform.startswith("linux"):
        try:  # die with the parent, so a kill -9 of the run leaves no orphan workers behind
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
        except OSError:
            pass


def _process_record(setup: _WorkerSetup, record: Record, slot: int, row: int) -> ItemResult:
    result = ItemResult(record.key, record.reason)
    max_chars = setup.max_token_length * MAX_CHARS_PER_TOKEN
    for raw in record.captions:
        text, note = decode_caption(raw)
        if text is None:
            result.caption_skips += 1
            continue
        if note:
            result.conversions.append(note)
        cut = len(text) > max_chars  # a 1 MB caption is not worth tokenizing whole
        tok = tokenize_caption(setup.tokenizer, setup.family, text[:max_chars] if cut else text,
                               setup.max_token_length)
        if tok.truncated or cut:
            # Store the text the stored tokens say, not the whole caption they were cut from.
            text = setup.tokenizer.decode(tok.tokens, skip_special_tokens=True).strip()
        result.captions.append(text)
        result.tokens.append(tok.tokens)
        result.num_truncated += int(tok.truncated or cut)
    if result.reason:
        return result
    if not result.captions:
        result.reason = "no_caption"
        return result
    if record.embedding is not None:
        result.embedding = record.embedding
        return result
    data = record.image
    if isinstance(data, str):
        try:
            with open(data, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            result.reason = "missing_image"
            return result
        except OSError:
            result.reason = "unreadable_image"
            return result
    decoded = decode_image(data, setup.max_pixels, setup.draft_size)
    result.conversions.extend(decoded.conversions)
    if decoded.image is None:
        result.reason = decoded.reason
        return result
    pixels = setup.pixel_fn(decoded.image)  # (3, H, W)
    if setup.buffers is not None:
        setup.buffers[slot, row] = pixels
    else:
        result.pixels = pixels
    return result


def _process_chunk(slot: int, row0: int, records: list[Record]) -> list[ItemResult]:
    setup = _SETUP
    assert setup is not None, "worker used before _worker_init"
    out = []
    for i, record in enumerate(records):
        try:
            out.append(_process_record(setup, record, slot, row0 + i))
        except Exception as err:  # noqa: BLE001 - one bad sample never stops the run
            print(f"prefixcap preprocess: unexpected error on sample {record.key!r}: {err!r}", file=sys.stderr)
            out.append(ItemResult(record.key, "worker_error"))
    return out


class _InlinePool:
    """num_prepro_workers 0: the same code in the calling thread (debugging, tiny runs)."""

    def __init__(self, setup: _WorkerSetup):
        self.setup = setup

    def apply_async(self, fn: Callable, args: tuple) -> Any:
        global _SETUP
        _SETUP = self.setup
        value = fn(*args)

        class _Done:
            def get(self, timeout: float | None = None) -> Any:
                return value
        return _Done()

    def terminate(self) -> None:
        pass

    def join(self) -> None:
        pass


# ---------------------------------------------------------------- batches and shards

@dataclass
class _Batch:
    unit: int
    part: int
    records: int  # input records consumed by this batch
    slot: int | None
    results: list[Any]  # async results, each -> list[ItemResult]
    end_of_part: bool
    last: bool  # the unit's final part
    subset_stop: bool = False


@dataclass
class _PartBuffer:
    unit: int
    part: int
    keys: list[str] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    image_rows: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    num_truncated: int = 0
    skipped_keys: list[list[str]] = field(default_factory=list)
    unit_norm: bool = True
    patch_tokens: list[np.ndarray] = field(default_factory=list)  # (N, C) float16 each, with patch_pool


@dataclass
class RunSummary:
    """Counts of one run (this rank) and the manifest when the dataset is complete."""

    num_images: int = 0
    num_captions: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    num_truncated: int = 0
    seconds: float = 0.0
    shards_written: int = 0
    manifest: Manifest | None = None


def check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Write settings.json on the first run; refuse a rerun into the same folder with other settings."""
    path = folder / SETTINGS
    if not path.exists():
        atomic_write_json(path, settings)
        return
    differences = settings_differences(json.loads(path.read_text()), settings)
    if differences:
        raise SettingsMismatchError(
            f"{folder} was preprocessed with other settings ({differences}); rerun with the original settings to "
            "resume, add --overwrite to start the folder afresh, or use another --output_folder")


def _unit_progress(done: dict[str, dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
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


def _rank_marker(folder: Path, rank: int, world: int) -> Path:
    return folder / PROGRESS_DIR / f"rank{rank:03d}-of-{world:03d}.done.json"


def try_write_manifest(folder: Path, world_size: int, header: Manifest) -> Manifest | None:
    """Write manifest.json when every rank has finished; returns it (or None if some rank is still running)."""
    if not all(_rank_marker(folder, r, world_size).exists() for r in range(world_size)):
        return None
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


def _allocate_buffers(slots: int, batch: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """Anonymous shared memory inherited by forked workers (not limited by a small /dev/shm)."""
    import mmap

    nbytes = slots * batch * int(np.prod(shape)) * dtype.itemsize
    try:
        buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    except (OSError, AttributeError, ValueError):
        return None
    return np.frombuffer(buf, dtype=dtype, count=slots * batch * int(np.prod(shape))).reshape(slots, batch, *shape)


def _lookahead(records: Iterator[Record]) -> Iterator[tuple[Record, bool]]:
    """(record, whether another follows): a part can be closed as its unit's last without an empty part."""
    previous = None
    for record in records:
        if previous is not None:
            yield previous, True
        previous = record
    if previous is not None:
        yield previous, False


class Runner:
    """Runs one rank of the preprocess stage into cfg.output_folder."""

    def __init__(self, cfg: RunConfig, reader: Reader, tokenizer: Any, family: str, max_token_length: int,
                 encoder: Any | None, settings: dict[str, Any], manifest_header: Manifest):
        self.cfg = cfg
        self.reader = reader
        self.tokenizer = tokenizer
        self.family = family
        self.max_token_length = max_token_length
        self.encoder = encoder
        self.settings = settings
        self.header = manifest_header
        self.folder = Path(cfg.output_folder)
        self._printed_skips = 0
        self._units = reader.units()

    # --- planning ---
    def _plan(self) -> tuple[list[tuple[int, int, int]], int, bool]:
        """[(unit, first part, records to skip)] left for this rank, records consumed so far, subset reached."""
        cfg = self.cfg
        units = self._units
        progress = _unit_progress(completed_shards(self.folder))
        plan, consumed, subset_done = [], 0, False
        for unit in range(cfg.rank, len(units), cfg.world_size):
            parts = progress.get(unit, [])
            consumed += sum(p.get("records", 0) for p in parts)
            if any(p.get("subset_stop") for p in parts):
                subset_done = True
            if parts and parts[-1].get("last"):
                continue
            plan.append((unit, len(parts), sum(p.get("records", 0) for p in parts)))
        return plan, consumed, subset_done

    def _subset_quota(self) -> int | None:
        n = self.cfg.subset_size
        if n is None:
            return None
        # Split evenly over ranks so the whole run stops after subset_size input samples.
        return n // self.cfg.world_size + (1 if self.cfg.rank < n % self.cfg.world_size else 0)

    def _clean_stale_tmp(self, units: set[int]) -> None:
        shard_dir = self.folder / SHARD_DIR
        if not shard_dir.is_dir():
            return
        for tmp in shard_dir.glob(".u*.tmp"):
            parsed = parse_shard_name(tmp.name[1:14])
            if parsed and parsed[0] in units:
                tmp.unlink(missing_ok=True)

    # --- the run ---
    def run(self) -> RunSummary:
        cfg = self.cfg
        self.folder.mkdir(parents=True, exist_ok=True)
        check_settings(self.folder, self.settings)
        summary = RunSummary()
        existing = self.folder / MANIFEST
        if existing.exists():
            summary.manifest = Manifest.read(self.folder)
            return summary
        marker = _rank_marker(self.folder, cfg.rank, cfg.world_size)
        if not marker.exists():
            self._run_units(summary)
            atomic_write_json(marker, {"rank": cfg.rank, "world_size": cfg.world_size, "time": time.time()})
        summary.manifest = try_write_manifest(self.folder, cfg.world_size, self.header)
        return summary

    def _run_units(self, summary: RunSummary) -> None:
        cfg = self.cfg
        plan, consumed, subset_done = self._plan()
        quota = self._subset_quota()
        if subset_done or (quota is not None and consumed >= quota):
            plan = []
        if not plan:
            return
        self._clean_stale_tmp({u for u, _, _ in plan})
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        pixels = make_pixel_pipeline(self.encoder) if self.encoder is not None else None
        workers = max(0, cfg.num_prepro_workers)
        slots = 3 if workers else 1  # batches in flight: one encoding, the next ones decoding
        use_fork = workers > 0 and "fork" in mp.get_all_start_methods()
        buffers = (_allocate_buffers(slots, cfg.batch_size, pixels.shape, pixels.dtype)
                   if pixels is not None and (use_fork or workers == 0) else None)
        setup = _WorkerSetup(pixels.worker_fn if pixels else None, buffers, self.tokenizer, self.family,
                             self.max_token_length, cfg.max_image_pixels,
                             (pixels.shape[-1] if cfg.jpeg_draft and pixels else None))
        raise_pil_limit(cfg.max_image_pixels)  # decode_image checks the limit itself; PIL must not be stricter
        if workers:
            ctx = mp.get_context("fork" if use_fork else "spawn")
            pool: Any = ctx.Pool(workers, initializer=_worker_init, initargs=(setup,))
        else:
            pool = _InlinePool(setup)

        sizes = [self.reader.unit_size(u) for u, _, _ in plan]
        total = None if any(s is None for s in sizes) else sum(s for s in sizes) - sum(skip for _, _, skip in plan)
        if quota is not None:
            total = min(total, quota - consumed) if total is not None else quota - consumed
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc=f"preprocess rank {cfg.rank}" if cfg.world_size > 1 else "preprocess",
                   disable=not cfg.progress, dynamic_ncols=True, smoothing=0.1)
        jobs: queue.Queue = queue.Queue(maxsize=slots + 1)
        free_slots: queue.Queue = queue.Queue()
        for s in range(slots):
            free_slots.put(s)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(plan, consumed, quota, pool, jobs, free_slots, stop,
                                                                 max(workers, 1)), daemon=True)
        start = time.time()
        producer.start()
        try:
            self._consume(jobs, free_slots, buffers, pixels, summary, bar)
        except BaseException:
            stop.set()
            pool.terminate()
            raise
        finally:
            bar.close()
            summary.seconds = time.time() - start
        producer.join()
        pool.terminate()
        pool.join()

    def _produce(self, plan: list[tuple[int, int, int]], consumed: int, quota: int | None, pool: Any,
                 jobs: queue.Queue, free_slots: queue.Queue, stop: threading.Event, workers: int) -> None:
        """Producer thread: records -> batches -> chunks submitted to the pool, in order."""
        cfg = self.cfg
        try:
            seen = self._consumed_keys()
            for unit, part, skip in plan:
                records = _lookahead(islice(self.reader.records(unit), skip, None))
                batch: list[Record] = []
                in_part = 0
                subset_stop = False
                for record, more in records:
                    if stop.is_set():
                        return
                    batch.append(self._dedup(record, seen))
                    in_part += 1
                    consumed += 1
                    subset_stop = quota is not None and consumed >= quota
                    if subset_stop:
                        break
                    if in_part == cfg.samples_per_shard and more:
                        # a full part with records after it; a unit that ends exactly here ends below,
                        # marked last, instead of leaving an empty part behind it
                        self._submit(unit, part, batch, True, False, False, pool, jobs, free_slots, workers)
                        batch, in_part, part = [], 0, part + 1
                    elif len(batch) == cfg.batch_size:
                        self._submit(unit, part, batch, False, False, False, pool, jobs, free_slots, workers)
                        batch = []
                self._submit(unit, part, batch, True, True, subset_stop, pool, jobs, free_slots, workers)
                if subset_stop:
                    break
            jobs.put(None)
        except BaseException as err:  # noqa: BLE001 - hand the error to the main thread
            jobs.put(err)

    def _dedup(self, record: Record, seen: set[int]) -> Record:
        """Keep the first record of a key; a later one (same key in a tar, in another tar, x.jpg and
        x.png) is skipped as duplicate_key. Keys are remembered as 64-bit hashes (this rank's input)."""
        if record.reason in _NOT_SAMPLE_REASONS:
            return record
        h = hash(record.key)
        if h in seen:
            return Record(record.key, None, [], reason="duplicate_key")
        seen.add(h)
        return record

    def _consumed_keys(self) -> set[int]:
        """Keys of the records this rank's completed parts consumed, so a resumed run skips the same duplicates."""
        from prefixcap.data.shards import shard_keys

        mine = set(range(self.cfg.rank, len(self._units), self.cfg.world_size))
        seen: set[int] = set()
        for name, stats in completed_shards(self.folder).items():
            parsed = parse_shard_name(name)
            if not parsed or parsed[0] not in mine:
                continue
            seen.update(hash(k) for k in shard_keys(self.folder, name))
            seen.update(hash(k) for k, reason in stats.get("skipped_keys", []) if reason not in _NOT_SAMPLE_REASONS)
        return seen

    def _submit(self, unit: int, part: int, batch: list[Record], end_of_part: bool, last: bool, subset_stop: bool,
                pool: Any, jobs: queue.Queue, free_slots: queue.Queue, workers: int) -> None:
        slot = free_slots.get() if batch else None
        chunk = max(1, math.ceil(len(batch) / (workers * 2)))
        results = [pool.apply_async(_process_chunk, (slot, i, batch[i:i + chunk])) for i in range(0, len(batch), chunk)]
        jobs.put(_Batch(unit, part, len(batch), slot, results, end_of_part, last, subset_stop))

    def _consume(self, jobs: queue.Queue, free_slots: queue.Queue, buffers: np.ndarray | None,
                 pixels: PixelPipeline | None, summary: RunSummary, bar: Any) -> None:
        """Main thread: batches in order -> encoder -> part buffers -> shards."""
        current: _PartBuffer | None = None
        while True:
            job = jobs.get()
            if job is None:
                return
            if isinstance(job, BaseException):
                raise job
            if current is None or (current.unit, current.part) != (job.unit, job.part):
                current = _PartBuffer(job.unit, job.part)
            items: list[ItemResult] = [r for res in job.results for r in res.get()]
            ok = [i for i, item in enumerate(items) if item.reason is None]
            embeddings, patch = self._embed(items, ok, job.slot, buffers, pixels)  # (len(ok), C) [, (len(ok), N, C)]
            if job.slot is not None:
                free_slots.put(job.slot)
            current.records += job.records
            for item in items:
                if item.reason is not None:
                    current.skipped[item.reason] += 1
                    self._log_skip(current, item.key, item.reason)
                    continue
                # conversions, truncations and dropped captions count only for what is stored
                current.converted.update(item.conversions)
                current.num_truncated += item.num_truncated
                if item.caption_skips:
                    current.skipped["empty_caption"] += item.caption_skips
            for row, i in enumerate(ok):
                item = items[i]
                image_row = len(current.keys)
                current.keys.append(item.key)
                current.embeddings.append(embeddings[row])
                if patch is not None:
                    current.patch_tokens.append(patch[row])
                for caption, tokens in zip(item.captions, item.tokens):
                    current.image_rows.append(image_row)
                    current.captions.append(caption)
                    current.tokens.append(tokens)
            if len(ok):
                norms = np.linalg.norm(embeddings.astype(np.float32), axis=-1)
                current.unit_norm &= bool(np.all(np.abs(norms - 1.0) < 1e-2))
            bar.update(job.records)
            if job.end_of_part:
                self._write(current, job, summary)
                current = None

    def _embed(self, items: list[ItemResult], ok: list[int], slot: int | None, buffers: np.ndarray | None,
               pixels: PixelPipeline | None) -> tuple[np.ndarray, np.ndarray | None]:
        """float16 (embeddings (n, C), patch tokens (n, N, C) or None) of the decoded items `ok`."""
        dim = int(self.header.embedding_dim)
        pool = self.cfg.patch_pool
        if not ok:
            shape = self.header.patch_tokens["num_tokens"] if pool else 0
            return np.zeros((0, dim), np.float16), (np.zeros((0, shape, dim), np.float16) if pool else None)
        if items[ok[0]].embedding is not None:
            return np.stack([items[i].embedding for i in ok]).astype(np.float16), None  # (n, C)
        if buffers is not None:
            batch = buffers[slot]
            array = batch[: len(ok)] if ok[-1] == len(ok) - 1 else batch[ok]  # all decoded: a zero-copy slice
        else:
            array = np.stack([items[i].pixels for i in ok])
        tensor = torch.from_numpy(array)  # (n, 3, H, W) uint8 or float32
        with torch.inference_mode():
            encoder_input = pixels.device_fn(tensor, self.encoder.device)  # (n, 3, H, W) float32 normalised
            if pool:
                out, patch = self.encoder.encode_pixels_with_tokens(encoder_input, pool)  # (n, C), (n, N, C)
                return out.to(torch.float16).cpu().numpy(), patch.to(torch.float16).cpu().numpy()
            out = self.encoder.encode_pixels(encoder_input)  # (n, C) float32
        return out.to(torch.float16).cpu().numpy(), None

    def _log_skip(self, part: _PartBuffer, key: str, reason: str) -> None:
        if len(part.skipped_keys) < MAX_SKIPPED_KEYS_PER_SHARD:
            part.skipped_keys.append([key, reason])
        if self._printed_skips < self.cfg.log_skipped:
            self._printed_skips += 1
            tail = " (further skipped keys are listed in the shard stats)" if self._printed_skips == self.cfg.log_skipped else ""
            print(f"prefixcap preprocess: skipped {key!r}: {reason}{tail}", file=sys.stderr)

    def _write(self, part: _PartBuffer, job: _Batch, summary: RunSummary) -> None:
        dim = int(self.header.embedding_dim)
        embeddings = np.stack(part.embeddings) if part.embeddings else np.zeros((0, dim), np.float16)
        content = ShardContent(part.keys, embeddings, part.image_rows, part.captions, part.tokens)
        if self.cfg.patch_pool:
            n = int(self.header.patch_tokens["num_tokens"])
            content.patch_tokens = (np.stack(part.patch_tokens) if part.patch_tokens
                                    else np.zeros((0, n, dim), np.float16))  # (N_images, N, C)
        stats = {
            "unit": part.unit, "unit_name": self._units[part.unit], "part": part.part,
            "records": part.records, "last": job.last, "subset_stop": job.subset_stop, "rank": self.cfg.rank,
            "skipped": dict(part.skipped), "converted": dict(part.converted), "num_truncated": part.num_truncated,
            "skipped_keys": part.skipped_keys, "unit_norm": part.unit_norm,
        }
        layout = getattr(self.reader, "input_layout", None)  # what was looked for / found, for an empty run
        if not part.keys and callable(layout) and layout():
            stats["input_layout"] = layout()
        write_shard(self.folder, shard_name(part.unit, part.part), content, stats)
        summary.num_images += len(part.keys)
        summary.num_captions += len(part.captions)
        summary.skipped.update(part.skipped)
        summary.converted.update(part.converted)
        summary.num_truncated += part.num_truncated
        summary.shards_written += bool(part.keys)  # as the manifest counts them: shards holding images
