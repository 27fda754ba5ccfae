"""Dynamic batching: images from concurrent requests are grouped per decoding options onto one model thread.

Why this shape: a captioner is much faster per image on a batch than one image at a time, and
decoding options (beams, sampling, lengths) are arguments of one `generate` call, so only
requests with identical options can share a batch. The group key is the frozen
`GenerationSettings` itself, normalized so knobs that cannot matter (a temperature without
sampling) do not split groups. All queue state lives on the event loop;
the model runs in a single worker thread so the loop keeps accepting and answering requests
(health checks, 503s, timeouts) while a batch is being decoded.

Retrieval models: an image whose request asks for its retrieved captions gets the ones its prompt was
built from. They are recorded while the batch is captioned (`Retriever.recording`), not retrieved
again, so they are the prompt's by construction; whether a request asks does not split groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

from prefixcap.generation import GenerationSettings
from prefixcap.caption.pipeline import call_with_fallback


class BatchCaptioner(Protocol):
    """What the batcher needs from a captioner (prefixcap.caption.captioner.Captioner provides it).

    A captioner may also have `retriever` (a prefixcap.retrieval.datastore.Retriever, or None): then
    images can be asked for with their retrieved captions.
    """

    def caption(self, images: Sequence[Any], batch_size: int, settings: GenerationSettings
                ) -> list[str] | list[list[str]]:
        """One caption per image, or a list of captions per image when num_return_sequences > 1."""


@dataclass
class BatchConfig:
    """How requests are grouped and how much may wait."""

    max_batch_size: int = 16  # images per model call
    max_wait_ms: float = 10.0  # how long the oldest queued image may wait for company
    max_queue: int = 256  # images waiting (not yet on the model); more -> QueueFull (503)
    request_timeout_s: float = 60.0  # queue wait + decoding, per request

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


class QueueFull(Exception):
    """The bounded queue cannot take this request now; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(Exception):
    """The request was not answered within the request timeout."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no more work."""


class Captions(list):
    """One image's captions (best first, a list of str); `retrieved`: the captions its prompt was built from
    (prefixcap.retrieval.datastore.Retrieved, most similar first), set only when its request asked for them."""

    retrieved: list | None = None


@dataclass
class BatcherStats:
    """Counters for observability (served by /healthz)."""

    requests: int = 0
    images: int = 0
    model_calls: int = 0
    images_captioned: int = 0
    largest_batch: int = 0
    queue_depth: int = 0
    max_queue_depth: int = 0
    rejected_queue_full: int = 0
    timeouts: int = 0
    model_errors: int = 0
    model_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_batch_size"] = round(self.images_captioned / self.model_calls, 3) if self.model_calls else 0.0
        out["model_seconds"] = round(self.model_seconds, 4)
        return out


@dataclass(eq=False)
class _Item:
    image: Any  # whatever the captioner's `caption` accepts: PIL image, preprocessed pixels, ...
    settings: GenerationSettings
    future: asyncio.Future
    retrieved: bool = False  # the request wants the retrieved captions of this image
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Queue images, group them by decoding settings, and caption each group in batches on one thread.

    Use inside a running event loop: `await start()`, then `await submit(images, settings)` from
    any number of concurrent tasks, and `await stop()` at shutdown.
    """

    def __init__(self, captioner: BatchCaptioner, config: BatchConfig | None = None):
        self.captioner = captioner
        self.config = config or BatchConfig()
        self.stats = BatcherStats()
        # Insertion-ordered: option groups are served oldest-head first, so no group starves.
        self._groups: dict[GenerationSettings, deque[_Item]] = {}
        self._pending = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        self._closed = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefixcap-model")
        self._task = asyncio.create_task(self._run(), name="prefixcap-batcher")

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for group in self._groups.values():
            for item in group:
                if not item.future.done():
                    item.future.set_exception(BatcherClosed("the server is shutting down"))
        self._groups.clear()
        self._set_pending(0)
        if self._executor is not None:
            # Don't wait for a batch in flight: its results have nowhere to go anymore.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # --- the public call -----------------------------------------------------------------
    async def submit(self, images: Sequence[Any], settings: GenerationSettings, timeout_s: float | None = None,
                     retrieved: bool = False) -> list[Captions | Exception]:
        """Captions for `images` (a Captions list per image), batched with other requests that
        decode the same way (`settings`, validated by the caller, normalized here). With `retrieved`
        (a captioner with a retriever), each Captions also carries its image's retrieved captions.

        An image the model failed on gets its exception in place of its captions, so the other
        images of the request keep theirs. Raises QueueFull when the queue has no room for all
        of them (nothing is queued then), RequestTimeout after `timeout_s` (default: the config's).
        """
        if self._closed or self._task is None:
            raise BatcherClosed("the batcher is not running")
        if not images:
            return []
        cfg = self.config
        if self._pending + len(images) > cfg.max_queue:
            self.stats.rejected_queue_full += 1
            raise QueueFull(f"the captioning queue is full ({self._pending}/{cfg.max_queue} images waiting); "
                            "retry later", self.retry_after())
        loop = asyncio.get_running_loop()
        key = settings.normalized()
        items = [_Item(image, key, loop.create_future(), retrieved) for image in images]
        self._groups.setdefault(key, deque()).extend(items)
        self._set_pending(self._pending + len(items))
        self.stats.requests += 1
        self.stats.images += len(items)
        self._wakeup.set()
        timeout_s = cfg.request_timeout_s if timeout_s is None else timeout_s
        try:
            gathered = asyncio.gather(*(it.future for it in items), return_exceptions=True)
            return list(await asyncio.wait_for(gathered, timeout_s))
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            raise RequestTimeout(f"no answer within the request timeout of {timeout_s:g} s; "
                                 "the server is busy, retry later", self.retry_after()) from None
        finally:
            self._forget(items)  # timed out or cancelled (client gone): free their queue slots

    def retry_after(self) -> int:
        """Seconds until the current queue is probably drained (at least 1), for Retry-After."""
        per_call = self.stats.model_seconds / self.stats.model_calls if self.stats.model_calls else 1.0
        calls = math.ceil(max(self._pending, 1) / self.config.max_batch_size)
        return max(1, math.ceil(calls * per_call))

    @property
    def queue_depth(self) -> int:
        return self._pending

    # --- internals -----------------------------------------------------------------------
    def _set_pending(self, n: int) -> None:
        self._pending = n
        self.stats.queue_depth = n
        self.stats.max_queue_depth = max(self.stats.max_queue_depth, n)

    def _forget(self, items: list[_Item]) -> None:
        """Drop items still queued (their request gave up); items already taken are not here."""
        group = self._groups.get(items[0].settings) if items else None
        if not group:
            return
        removed = 0
        for item in items:
            try:
                group.remove(item)
                removed += 1
            except ValueError:
                pass  # already on the model or answered
        if removed:
            self._set_pending(self._pending - removed)
            if not group:
                del self._groups[items[0].settings]

    def _oldest_group(self) -> GenerationSettings | None:
        heads = [(group[0].enqueued, key) for key, group in self._groups.items() if group]
        return min(heads, key=lambda h: h[0])[1] if heads else None

    async def _next_batch(self) -> list[_Item]:
        """Wait until the oldest group is full or its oldest image waited max_wait_ms; take it."""
        cfg = self.config
        while True:
            key = self._oldest_group()
            if key is None:
                return []
            group = self._groups[key]
            wait = group[0].enqueued + cfg.max_wait_ms / 1000 - time.monotonic()
            if len(group) >= cfg.max_batch_size or wait <= 0:
                batch = [group.popleft() for _ in range(min(cfg.max_batch_size, len(group)))]
                if not group:
                    del self._groups[key]
                self._set_pending(self._pending - len(batch))
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait)  # new arrivals re-check fullness
            except asyncio.TimeoutError:
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [it for it in await self._next_batch() if not it.future.done()]
            if not batch:
                continue
            results = await loop.run_in_executor(self._executor, self._caption_batch, batch)
            for item, result in zip(batch, results):
                if item.future.done():
                    continue  # its request timed out while the model ran
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _caption_batch(self, batch: list[_Item]) -> list[Captions | Exception]:
        """Runs on the model thread. One call for the batch; if it fails, one call per image,
        so an image the model cannot handle fails alone, not its batch-mates."""
        settings = batch[0].settings
        record = any(it.retrieved for it in batch)
        out = call_with_fallback(lambda images: self._timed_call(images, settings, record), [it.image for it in batch])
        self.stats.model_errors += sum(isinstance(r, Exception) for r in out)
        for item, result in zip(batch, out):
            if isinstance(result, Captions) and not item.retrieved:
                result.retrieved = None  # a batch-mate asked; this image's request did not
        return out

    def _timed_call(self, images: list[Any], settings: GenerationSettings, record: bool = False) -> list[Captions]:
        retriever = getattr(self.captioner, "retriever", None) if record else None
        start = time.perf_counter()
        try:
            with retriever.recording() if retriever is not None else contextlib.nullcontext() as log:
                raw = self.captioner.caption(images, batch_size=len(images), settings=settings)
        finally:
            self.stats.model_calls += 1
            self.stats.model_seconds += time.perf_counter() - start
        if len(raw) != len(images):
            raise RuntimeError(f"captioner returned {len(raw)} results for {len(images)} images")
        if log is not None and len(log) != len(images):
            raise RuntimeError(f"the retriever was queried for {len(log)} images in a batch of {len(images)}; "
                               "cannot tell which retrieved captions went into which prompt")
        self.stats.images_captioned += len(images)
        self.stats.largest_batch = max(self.stats.largest_batch, len(images))
        out = [Captions([r] if isinstance(r, str) else r) for r in raw]
        for captions, hits in zip(out, log or []):
            captions.retrieved = hits
        return out
