"""Batch captioning: items (an image or a CLIP embedding) -> prefetched, decoded batches -> captions, per-item errors.

The one path behind `prefixcap caption`, `prefixcap evaluate --model` and training's validation
CIDEr. It calls the Captioner (pixels -> embeddings -> captions), never the other way round;
`Captioner.caption` has its own small loop, which stops at a bad input. Worker threads decode and
preprocess the next batches while the current one is on the device (PIL releases the GIL). A
batch the model fails on is retried one item at a time, so a bad item fails alone and its
batch-mates keep their captions.
With `encode_ahead`, a further thread runs the CLIP encoder on the next batch while the current
one generates (the caption CLI's re-captioning of shards uses it).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from prefixcap.errors import PrefixcapError
from prefixcap.interrupts import check as check_interrupt

if TYPE_CHECKING:
    from prefixcap.caption.captioner import Captioner
    from prefixcap.generation import GenerationSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class EmbeddingWidthError(PrefixcapError, ValueError):
    """An embedding input whose width is not the model's: every item of that input would fail, so the run stops."""


@dataclass
class Item:
    """One thing to caption: an image (bytes, path, PIL image, array), a (C,) CLIP embedding, or a known error."""

    key: str
    image: Any = None
    embedding: np.ndarray | None = None  # (C,)
    patch_tokens: np.ndarray | None = None  # (N, C) stored patch tokens: what a token mapper reads, when given
    error: str | None = None  # set by the source (missing image, unreadable sample) or by decoding
    meta: Any = None  # carried through untouched (e.g. the input shard the item came from)


@dataclass
class Result:
    """The captions of one item (num_return_sequences of them, best first), or why there are none."""

    key: str
    captions: list[str] = field(default_factory=list)
    scores: list[float] | None = None  # one per caption, with return_scores
    error: str | None = None
    item: Item | None = None

    @property
    def caption(self) -> str:
        return self.captions[0] if self.captions else ""


@dataclass
class PipelineOptions:
    """How items are batched, decoded and decoded into text."""

    batch_size: int = 32
    num_workers: int = 4  # threads decoding and preprocessing images
    prefetch: int = 2  # batches decoded ahead of the one on the device
    return_scores: bool = False
    settings: GenerationSettings | None = None  # default: the captioner's own
    generate_kwargs: dict[str, Any] = field(default_factory=dict)  # passed verbatim to the LM's generate
    # Encode the next batch's images with CLIP in a background thread while the current batch
    # generates. It calls the encoder outside the Captioner's lock, so it is for a caller that
    # owns the Captioner (the caption CLI), not for one shared by threads (the HTTP service).
    encode_ahead: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")


@dataclass
class PreparedBatch:
    """A batch with every image item decoded into the encoder's pixels (or given its error)."""

    items: list[Item]
    pixels: list[np.ndarray | None]  # (3, H, W) float32 per decoded image item; None for the others
    encoded: dict[int, torch.Tensor] | None = None  # item index -> (C,) embedding, set by encode-ahead


# --------------------------------------------------------------------------- the fallback policy
def call_with_fallback(fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R | Exception]:
    """fn over the whole batch; if it raises, fn over each item alone, so only the items that fail get an exception.

    fn must return one result per item, in order. KeyboardInterrupt and other BaseExceptions pass through.
    """
    def checked(chunk: list[T]) -> list[R]:
        out = list(fn(chunk))
        if len(out) != len(chunk):
            raise RuntimeError(f"got {len(out)} results for {len(chunk)} items")
        return out

    if not items:
        return []
    try:
        return list(checked(items))
    except Exception as exc:  # noqa: BLE001 - retried per item below; a lone item keeps its own exception
        if len(items) == 1:
            return [exc]
        logger.debug("batch of %d failed (%s); retrying item by item", len(items), exc)
    out: list[R | Exception] = []
    for item in items:
        try:
            out.extend(checked([item]))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


def error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- items -> prepared batches
def _prepare_one(cap: Captioner, item: Item) -> np.ndarray | None:
    if item.error is not None or item.embedding is not None:
        return None
    try:
        return cap.preprocess(item.image)  # (3, H, W)
    except Exception as err:  # noqa: BLE001 - a broken input is reported on its own; the run goes on
        item.error = error_text(err)
        return None


def _checked_embedding(cap: Captioner, item: Item) -> None:
    """Flatten an embedding item to float32 (C,) (patch tokens: (N, C)); a width the model cannot take
    stops the run at once."""
    if cap.config.mapping.takes_tokens and item.patch_tokens is not None:
        item.embedding = item.patch_tokens  # a preprocessed dataset's stored tokens (checked below)
    emb = np.asarray(item.embedding, dtype=np.float32).reshape(-1)
    shape = cap.config.mapping.input_shape
    width = int(np.prod(shape))
    if cap.config.mapping.takes_tokens and emb.shape[0] == width:
        item.embedding = emb.reshape(shape)  # (N, C) stored patch tokens
        return
    if emb.shape[0] != width:
        raise EmbeddingWidthError(
            f"embedding of {item.key!r} has {emb.shape[0]} values but the model expects {width} "
            f"(embeddings of {cap.config.clip_model!r}); caption it with a model trained on this encoder")
    item.embedding = emb


def prepared_batches(cap: Captioner, items: Iterable[Item], batch_size: int, pool: ThreadPoolExecutor,
                     prefetch: int = 2) -> Iterator[PreparedBatch]:
    """Batches in input order; the next `prefetch` batches are decoded in `pool` while one is consumed."""
    pending: deque[tuple[list[Item], list[Future]]] = deque()

    def submit(batch: list[Item]) -> None:
        pending.append((batch, [pool.submit(_prepare_one, cap, it) for it in batch]))

    def resolve(entry: tuple[list[Item], list[Future]]) -> PreparedBatch:
        batch, futures = entry
        return PreparedBatch(batch, [f.result() for f in futures])

    batch: list[Item] = []
    for item in items:
        if item.error is None and item.embedding is not None:
            _checked_embedding(cap, item)
        batch.append(item)
        if len(batch) == batch_size:
            submit(batch)
            batch = []
            if len(pending) > prefetch:
                yield resolve(pending.popleft())
    if batch:
        submit(batch)
    while pending:
        yield resolve(pending.popleft())


# --------------------------------------------------------------------------- prepared batches -> captions
def batch_embeddings(cap: Captioner, batch: PreparedBatch, indices: list[int]) -> torch.Tensor:
    """The (b, C) float32 CLIP embeddings of batch items `indices` (images encoded here), in that order."""
    rows: dict[int, torch.Tensor] = {i: batch.encoded[i] for i in indices if batch.encoded and i in batch.encoded}
    images = [i for i in indices if batch.pixels[i] is not None and i not in rows]
    if images:
        pixels = torch.from_numpy(np.stack([batch.pixels[i] for i in images]))  # (b, 3, H, W)
        rows.update(zip(images, cap.encode_pixels(pixels).float().to(cap.device)))  # (b, C)
    given = [i for i in indices if batch.pixels[i] is None and i not in rows]
    if given:
        emb = torch.from_numpy(np.stack([batch.items[i].embedding for i in given])).to(cap.device)  # (e, C)
        rows.update(zip(given, emb))
    return torch.stack([rows[i] for i in indices])  # (b, C)


def caption_prepared(cap: Captioner, batch: PreparedBatch, settings: GenerationSettings,
                     return_scores: bool = False, **generate_kwargs: Any) -> list[Result]:
    """One result per item, in order; items the model fails on get their error, the others their captions."""
    results = [Result(it.key, error=it.error, item=it) for it in batch.items]
    ready = [i for i, it in enumerate(batch.items) if it.error is None]

    def run(indices: list[int]) -> list[tuple[list[str], list[float] | None]]:
        return cap.generate_captions(batch_embeddings(cap, batch, indices), settings, return_scores,
                                     **generate_kwargs)

    for i, outcome in zip(ready, call_with_fallback(run, ready)):
        if isinstance(outcome, Exception):
            results[i].error = error_text(outcome)
        else:
            results[i].captions, results[i].scores = outcome
    return results


# --------------------------------------------------------------------------- encode-ahead
@torch.inference_mode()
def _encode_batch(cap: Captioner, batch: PreparedBatch) -> PreparedBatch:
    """Fill batch.encoded with the CLIP embeddings of its decoded images; on failure leave it unset, so
    caption_prepared encodes them itself and call_with_fallback isolates the item that fails."""
    images = [i for i, p in enumerate(batch.pixels) if p is not None]
    if images:
        try:
            pixels = torch.from_numpy(np.stack([batch.pixels[i] for i in images]))  # (b, 3, H, W)
            rows = cap.features(pixels).float().to(cap.device)  # (b, C), or (b, N, C) patch tokens
            batch.encoded = dict(zip(images, rows))
        except Exception as err:  # noqa: BLE001 - retried on the main path, item by item if need be
            logger.debug("encode-ahead of a batch failed (%s); encoding on the main path", err)
    return batch


def encoded_ahead(cap: Captioner, batches: Iterable[PreparedBatch]) -> Iterator[PreparedBatch]:
    """The same batches, each one's images encoded in a background thread while the previous one is consumed."""
    with ThreadPoolExecutor(1, thread_name_prefix="prefixcap-encode") as encoder:
        pending: Future | None = None
        try:
            for batch in batches:
                future = encoder.submit(_encode_batch, cap, batch)
                if pending is not None:
                    yield pending.result()
                pending = future
            if pending is not None:
                yield pending.result()
        finally:
            if pending is not None:
                pending.cancel()


def caption_batches(cap: Captioner, items: Iterable[Item], options: PipelineOptions | None = None,
                    pool: ThreadPoolExecutor | None = None) -> Iterator[list[Result]]:
    """Caption items batch by batch, in input order (one result per item); `pool` defaults to a private one."""
    options = options or PipelineOptions()
    settings = options.settings or cap.settings
    own = pool is None
    if pool is None:
        pool = ThreadPoolExecutor(max(1, options.num_workers), thread_name_prefix="prefixcap-decode")
    try:
        batches: Iterable[PreparedBatch] = prepared_batches(cap, items, options.batch_size, pool, options.prefetch)
        if options.encode_ahead:
            batches = encoded_ahead(cap, batches)
        for batch in batches:
            check_interrupt()  # Ctrl-C: stop between batches (finished output shards are kept)
            yield caption_prepared(cap, batch, settings, options.return_scores, **options.generate_kwargs)
    finally:
        if own:
            pool.shutdown(wait=False, cancel_futures=True)


def caption_items(cap: Captioner, items: Iterable[Item], options: PipelineOptions | None = None) -> Iterator[Result]:
    """caption_batches, one result at a time."""
    for results in caption_batches(cap, items, options):
        yield from results
