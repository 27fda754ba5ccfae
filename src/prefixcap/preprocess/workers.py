"""Preprocess workers: read, decode and resize each record's image into a shared batch slot and tokenize its captions.

A pool runs `process_chunk` on a slice of a batch; the main process only waits for the results in
order. With num_prepro_workers > 0 the pool is worker processes, each given the WorkerSetup once
when it starts (a fork inherits the shared pixel buffers); with 0 the same code runs in the calling
thread with the setup the pool holds.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from prefixcap.data.decode import decode_caption
from prefixcap.data.images import decode_image, raise_pil_limit
from prefixcap.data.readers import Record
from prefixcap.model.language_models import tokenize_caption

MAX_CHARS_PER_TOKEN = 64  # captions are cut to max_token_length * this many characters before tokenizing


@dataclass
class WorkerSetup:
    """What every worker needs, given once: the pixel function, the shared buffers, the tokenizer."""

    pixel_fn: Callable[[Any], np.ndarray] | None
    buffers: np.ndarray | None  # (slots, batch, 3, H, W) shared with the main process, or None
    tokenizer: Any
    family: str
    max_token_length: int
    max_pixels: int
    draft_size: int | None
    text_only: bool = False  # records are captions only (data.text_only): tokenize, never decode an image


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


def _tokenize_captions(setup: WorkerSetup, record: Record, result: ItemResult) -> None:
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


def _process_record(setup: WorkerSetup, record: Record, slot: int, row: int) -> ItemResult:
    result = ItemResult(record.key, record.reason)
    _tokenize_captions(setup, record, result)
    if result.reason:
        return result
    if not result.captions:
        result.reason = "no_caption"
        return result
    if record.embedding is not None:
        result.embedding = record.embedding
        return result
    if setup.text_only:  # the main process embeds the caption (preprocess.text)
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


def process_chunk(setup: WorkerSetup, slot: int, row0: int, records: list[Record]) -> list[ItemResult]:
    """Results of records[i], whose pixels go to row row0 + i of batch slot `slot`; never raises per sample."""
    out = []
    for i, record in enumerate(records):
        try:
            out.append(_process_record(setup, record, slot, row0 + i))
        except Exception as err:  # noqa: BLE001 - one bad sample never stops the run
            print(f"prefixcap preprocess: unexpected error on sample {record.key!r}: {err!r}", file=sys.stderr)
            out.append(ItemResult(record.key, "worker_error"))
    return out


class PendingChunk(Protocol):
    def get(self, timeout: float | None = None) -> list[ItemResult]: ...


class ChunkPool(Protocol):
    """Where batches are processed: `submit` a chunk, `get` its results later, in submission order."""

    def submit(self, slot: int | None, row0: int, records: list[Record]) -> PendingChunk: ...
    def terminate(self) -> None: ...
    def join(self) -> None: ...


# A worker process's setup: set once, by the pool's initializer, in that process only (the main
# process never sets it); a pool task can carry no tokenizer or shared buffer of its own.
_PROCESS_SETUP: WorkerSetup | None = None


def _worker_init(setup: WorkerSetup) -> None:
    global _PROCESS_SETUP
    # A forked worker inherits the main process's stop-request handler (prefixcap.interrupts), which
    # runs only when the worker's main thread executes Python; blocked in native code it would never
    # die of pool.terminate()'s SIGTERM and the pool's join would hang. Workers die of SIGTERM at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _PROCESS_SETUP = setup
    raise_pil_limit(setup.max_pixels)  # spawned workers start with PIL's default
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    if sys.platform.startswith("linux"):
        try:  # die with the parent, so a kill -9 of the run leaves no orphan workers behind
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
        except OSError:
            pass


def _process_chunk_in_worker(slot: int, row0: int, records: list[Record]) -> list[ItemResult]:
    assert _PROCESS_SETUP is not None, "worker used before _worker_init"
    return process_chunk(_PROCESS_SETUP, slot, row0, records)


class ProcessPool:
    """num_prepro_workers > 0: worker processes started with `start_method`, each initialised with the setup."""

    def __init__(self, setup: WorkerSetup, workers: int, start_method: str):
        self._pool = mp.get_context(start_method).Pool(workers, initializer=_worker_init, initargs=(setup,))

    def submit(self, slot: int | None, row0: int, records: list[Record]) -> PendingChunk:
        return self._pool.apply_async(_process_chunk_in_worker, (slot, row0, records))

    def terminate(self) -> None:
        self._pool.terminate()

    def join(self) -> None:
        self._pool.join()


@dataclass
class _Done:
    value: list[ItemResult]

    def get(self, timeout: float | None = None) -> list[ItemResult]:
        return self.value


class InlinePool:
    """num_prepro_workers 0: the same code in the calling thread (debugging, tiny runs), with the setup it holds."""

    def __init__(self, setup: WorkerSetup):
        self.setup = setup

    def submit(self, slot: int | None, row0: int, records: list[Record]) -> PendingChunk:
        return _Done(process_chunk(self.setup, slot, row0, records))

    def terminate(self) -> None:
        pass

    def join(self) -> None:
        pass
