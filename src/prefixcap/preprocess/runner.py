"""The preprocess runner: worker processes decode, the main process encodes in batches and writes resumable shards.

Pipeline (one process per rank):
  producer thread   reads records of this rank's units in order, groups them into batches and hands
                    chunks of each batch to a pool of worker processes (preprocess.workers)
  worker processes  read/decode/convert each image, apply the encoder's resize+crop and write uint8
                    pixels straight into a shared-memory batch slot (preprocess.pixels); tokenize the captions
  main thread       waits for batches in order, normalises + encodes them on the device under
                    torch.inference_mode, and writes a shard every --samples_per_shard input records

Which units are left, how shards are named and when the manifest is written: preprocess.progress.
"""

from __future__ import annotations

import enum
import math
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from prefixcap.data.images import DEFAULT_MAX_IMAGE_PIXELS, raise_pil_limit
from prefixcap.data.readers import Reader, Record
from prefixcap.data.shards import MANIFEST, Manifest, ShardContent, write_shard
from prefixcap.interrupts import check as check_interrupt
from prefixcap.preprocess.pixels import PixelPipeline, allocate_buffers, make_pixel_pipeline
from prefixcap.data.decode import NOT_SAMPLE_REASONS
from prefixcap.preprocess.progress import (
    PlannedUnit, PreprocessSummary, check_settings, consumed_keys, mark_rank_done, plan_rank,
    rank_done, remove_stale_temporaries, shard_name, try_write_manifest,
)
from prefixcap.preprocess.workers import ChunkPool, InlinePool, ItemResult, PendingChunk, ProcessPool, WorkerSetup

MAX_SKIPPED_KEYS_PER_SHARD = 10000


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
    text_only: bool = False  # records are captions: embed each with the encoder's text tower (preprocess.text)


class BatchEnd(enum.Enum):
    """What a batch closes: nothing, its part, its unit, or the whole run (--subset_size reached)."""

    NONE = "none"  # more records of the same part follow
    PART = "part"  # the part is full; its unit continues in the next part
    UNIT = "unit"  # the unit's last part
    SUBSET = "subset"  # --subset_size reached: the unit's last part, and this rank's


@dataclass
class _Batch:
    unit: int
    part: int
    records: int  # input records consumed by this batch
    slot: int | None
    results: list[PendingChunk]  # each -> list[ItemResult]
    end: BatchEnd

    @property
    def end_of_part(self) -> bool:
        return self.end is not BatchEnd.NONE

    @property
    def last(self) -> bool:  # the unit's final part
        return self.end in (BatchEnd.UNIT, BatchEnd.SUBSET)

    @property
    def subset_stop(self) -> bool:
        return self.end is BatchEnd.SUBSET


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
class _Feed:
    """The producer's side of the pipeline: the pool that processes chunks, the batches in order, the free slots."""

    pool: ChunkPool
    jobs: queue.Queue  # _Batch in input order, then None (done) or the producer's exception
    free_slots: queue.Queue  # pixel buffer slots not holding a batch in flight
    workers: int
    stop: threading.Event = field(default_factory=threading.Event)

    def submit(self, unit: int, part: int, batch: list[Record], end: BatchEnd) -> None:
        """Hand the batch to the pool in chunks (about two per worker) and queue it for the main thread."""
        slot = self.free_slots.get() if batch else None
        chunk = max(1, math.ceil(len(batch) / (self.workers * 2)))
        results = [self.pool.submit(slot, i, batch[i:i + chunk]) for i in range(0, len(batch), chunk)]
        self.jobs.put(_Batch(unit, part, len(batch), slot, results, end))


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

    def _subset_quota(self) -> int | None:
        n = self.cfg.subset_size
        if n is None:
            return None
        # Split evenly over ranks so the whole run stops after subset_size input samples.
        return n // self.cfg.world_size + (1 if self.cfg.rank < n % self.cfg.world_size else 0)

    # --- the run ---
    def run(self) -> PreprocessSummary:
        cfg = self.cfg
        self.folder.mkdir(parents=True, exist_ok=True)
        check_settings(self.folder, self.settings)
        summary = PreprocessSummary()
        existing = self.folder / MANIFEST
        if existing.exists():
            summary.manifest = Manifest.read(self.folder)
            return summary
        if not rank_done(self.folder, cfg.rank, cfg.world_size):
            self._run_units(summary)
            mark_rank_done(self.folder, cfg.rank, cfg.world_size)
        summary.manifest = try_write_manifest(self.folder, cfg.world_size, self.header)
        return summary

    def _run_units(self, summary: PreprocessSummary) -> None:
        cfg = self.cfg
        plan = plan_rank(self.folder, cfg.rank, cfg.world_size, len(self._units))
        quota = self._subset_quota()
        if plan.subset_done or (quota is not None and plan.consumed >= quota) or not plan.units:
            return
        remove_stale_temporaries(self.folder, {u.unit for u in plan.units})
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        pixels = make_pixel_pipeline(self.encoder) if self.encoder is not None and not cfg.text_only else None
        workers = max(0, cfg.num_prepro_workers)
        slots = 3 if workers else 1  # batches in flight: one encoding, the next ones decoding
        use_fork = workers > 0 and "fork" in mp.get_all_start_methods()
        buffers = (allocate_buffers(slots, cfg.batch_size, pixels.shape, pixels.dtype)
                   if pixels is not None and (use_fork or workers == 0) else None)
        setup = WorkerSetup(pixels.worker_fn if pixels else None, buffers, self.tokenizer, self.family,
                            self.max_token_length, cfg.max_image_pixels,
                            (pixels.shape[-1] if cfg.jpeg_draft and pixels else None), text_only=cfg.text_only)
        raise_pil_limit(cfg.max_image_pixels)  # decode_image checks the limit itself; PIL must not be stricter
        pool = ProcessPool(setup, workers, "fork" if use_fork else "spawn") if workers else InlinePool(setup)
        feed = _Feed(pool, queue.Queue(maxsize=slots + 1), queue.Queue(), max(workers, 1))
        for s in range(slots):
            feed.free_slots.put(s)

        bar = self._progress_bar(plan.units, plan.consumed, quota)
        producer = threading.Thread(target=self._produce, args=(plan.units, plan.consumed, quota, feed), daemon=True)
        start = time.time()
        producer.start()
        try:
            self._consume(feed, buffers, pixels, summary, bar)
        except BaseException:
            feed.stop.set()
            pool.terminate()
            raise
        finally:
            bar.close()
            summary.seconds = time.time() - start
        producer.join()
        pool.terminate()
        pool.join()

    def _progress_bar(self, units: list[PlannedUnit], consumed: int, quota: int | None) -> Any:
        """tqdm over the input records left (unknown when a unit's size is)."""
        from tqdm import tqdm

        sizes = [self.reader.unit_size(u.unit) for u in units]
        total = None if any(s is None for s in sizes) else sum(s for s in sizes) - sum(u.skip for u in units)
        if quota is not None:
            total = min(total, quota - consumed) if total is not None else quota - consumed
        desc = f"preprocess rank {self.cfg.rank}" if self.cfg.world_size > 1 else "preprocess"
        return tqdm(total=total, unit="img", desc=desc, disable=not self.cfg.progress, dynamic_ncols=True,
                    smoothing=0.1)

    def _produce(self, units: list[PlannedUnit], consumed: int, quota: int | None, feed: _Feed) -> None:
        """Producer thread: records -> batches -> chunks submitted to the pool, in order."""
        cfg = self.cfg
        try:
            mine = set(range(cfg.rank, len(self._units), cfg.world_size))
            seen = consumed_keys(self.folder, mine)
            for unit, part, skip in units:
                records = _lookahead(islice(self.reader.records(unit), skip, None))
                batch: list[Record] = []
                in_part = 0
                subset_stop = False
                for record, more in records:
                    if feed.stop.is_set():
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
                        feed.submit(unit, part, batch, BatchEnd.PART)
                        batch, in_part, part = [], 0, part + 1
                    elif len(batch) == cfg.batch_size:
                        feed.submit(unit, part, batch, BatchEnd.NONE)
                        batch = []
                feed.submit(unit, part, batch, BatchEnd.SUBSET if subset_stop else BatchEnd.UNIT)
                if subset_stop:
                    break
            feed.jobs.put(None)
        except BaseException as err:  # noqa: BLE001 - hand the error to the main thread
            feed.jobs.put(err)

    def _dedup(self, record: Record, seen: set[int]) -> Record:
        """Keep the first record of a key; a later one (same key in a tar, in another tar, x.jpg and
        x.png) is skipped as duplicate_key. Keys are remembered as 64-bit hashes (this rank's input)."""
        if record.reason in NOT_SAMPLE_REASONS:
            return record
        h = hash(record.key)
        if h in seen:
            return Record(record.key, None, [], reason="duplicate_key")
        seen.add(h)
        return record

    def _consume(self, feed: _Feed, buffers: np.ndarray | None, pixels: PixelPipeline | None,
                 summary: PreprocessSummary, bar: Any) -> None:
        """Main thread: batches in order -> encoder -> part buffers -> shards."""
        current: _PartBuffer | None = None
        while True:
            job = feed.jobs.get()
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
                feed.free_slots.put(job.slot)
            current.records += job.records
            self._add(current, items, ok, embeddings, patch)
            bar.update(job.records)
            if job.end_of_part:
                self._write(current, job, summary)
                current = None
            check_interrupt()  # Ctrl-C: stop after this batch (complete shards are kept)

    def _add(self, part: _PartBuffer, items: list[ItemResult], ok: list[int], embeddings: np.ndarray,
             patch: np.ndarray | None) -> None:
        """Count a batch's skips and conversions into its part and append its decoded items (rows of embeddings)."""
        for item in items:
            if item.reason is not None:
                part.skipped[item.reason] += 1
                self._log_skip(part, item.key, item.reason)
                continue
            # conversions, truncations and dropped captions count only for what is stored
            part.converted.update(item.conversions)
            part.num_truncated += item.num_truncated
            if item.caption_skips:
                part.skipped["empty_caption"] += item.caption_skips
        for row, i in enumerate(ok):
            item = items[i]
            image_row = len(part.keys)
            part.keys.append(item.key)
            part.embeddings.append(embeddings[row])
            if patch is not None:
                part.patch_tokens.append(patch[row])
            for caption, tokens in zip(item.captions, item.tokens):
                part.image_rows.append(image_row)
                part.captions.append(caption)
                part.tokens.append(tokens)
        if len(ok):
            norms = np.linalg.norm(embeddings.astype(np.float32), axis=-1)
            part.unit_norm &= bool(np.all(np.abs(norms - 1.0) < 1e-2))

    def _embed(self, items: list[ItemResult], ok: list[int], slot: int | None, buffers: np.ndarray | None,
               pixels: PixelPipeline | None) -> tuple[np.ndarray, np.ndarray | None]:
        """float16 (embeddings (n, C), patch tokens (n, N, C) or None) of the decoded items `ok`."""
        dim = int(self.header.embedding_dim)
        pool = self.cfg.patch_pool
        if not ok:
            shape = self.header.patch_tokens["num_tokens"] if pool else 0
            return np.zeros((0, dim), np.float16), (np.zeros((0, shape, dim), np.float16) if pool else None)
        if self.cfg.text_only:  # one caption per record: its CLIP text embedding
            from prefixcap.preprocess.text import TEXT_TRUNCATED, encode_captions

            embeddings, cut = encode_captions(self.encoder, [items[i].captions[0] for i in ok])  # (n, C)
            for i, was_cut in zip(ok, cut):
                if was_cut:
                    items[i].conversions.append(TEXT_TRUNCATED)
            return embeddings, None
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

    def _write(self, part: _PartBuffer, job: _Batch, summary: PreprocessSummary) -> None:
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
