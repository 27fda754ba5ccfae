"""Fast batched captioning: images or CLIP embeddings -> prefix -> the LM's own `generate` (KV cache on).

The original ClipCap decoded one image at a time and re-ran the whole sequence for every token.
Here the encoder and the LM both run on whole batches, the prefix goes to `generate` as
`inputs_embeds` (causal LMs) or as the encoder's `inputs_embeds` (seq2seq LMs), and every decoding
strategy `generate` offers (greedy, beam search, sampling, penalties, several returned sequences)
comes for free. The only Python work per token is what `generate` itself does.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from prefixcap.data.images import ImageInputError, load_image
from prefixcap.model.encoders import ImageEncoder, load_encoder
from prefixcap.generation import GenerationSettings
from prefixcap.model.captioning import CaptionModel
from prefixcap.model.config import CaptionConfig
from prefixcap.model.packing import pack_linear_layers

logger = logging.getLogger(__name__)

# What `caption` accepts for one image.
ImageInput = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray | torch.Tensor


@dataclass
class GenerationOutput:
    """Raw result of one batch: generated token ids (eos and padding removed) and optional scores."""

    tokens: list[list[int]]  # B * num_return_sequences rows, grouped by input
    scores: list[float] | None  # one per row: mean log-probability per token (beam: beam score)


def _contiguous_input(_module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


class Captioner:
    """A loaded captioning model plus its CLIP encoder; thread-safe, keeps everything on `device`."""

    def __init__(self, model: CaptionModel, encoder: ImageEncoder | None = None,
                 clip_model: str | None = None, settings: GenerationSettings | None = None,
                 encoder_dtype: torch.dtype | None = None, num_decode_threads: int | None = None,
                 retriever: Any | None = None):
        self.model = model.eval()
        # prefixcap.retrieval.datastore.Retriever of a retrieval-augmented model (None: plain prefix captioning)
        self.retriever = retriever
        self.config: CaptionConfig = model.config
        self.tokenizer = model.tokenizer
        self.device = next(model.parameters()).device
        self.settings = (settings or GenerationSettings()).validate()
        self.clip_model = clip_model or self.config.clip_model
        self._encoder = encoder
        self._encoder_dtype = encoder_dtype
        self._preprocess: Callable[[Image.Image], np.ndarray] | None = None
        self._lock = threading.RLock()  # one generate at a time: concurrent callers queue here
        self._threads = num_decode_threads or min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pools_lock = threading.Lock()
        self.is_seq2seq = self.config.lm_family == "seq2seq"
        self.eos_token_id = self.tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("the model's tokenizer has no end-of-text token; training appends one, "
                             "so the artifact's tokenizer/ folder is broken")
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.eos_token_id
        head = model.lm.get_output_embeddings()
        if head is not None:
            # generate's first step feeds the LM head a strided slice hidden[:, -1:, :]; on CPU
            # F.linear is ~8x slower on such a view (measured in bench/profile_generate.py).
            head.register_forward_pre_hook(_contiguous_input)

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, clip_model: str | None = None, datastore: str | None = None,
                        pack_weights: bool = True, quantize: str | None = None, **hf_kwargs: Any) -> Captioner:
        """Load a prefixcap artifact (folder or Hub id); the CLIP encoder named in its config is
        loaded on first use (`clip_model` overrides the name, e.g. a local copy of it). A retrieval-augmented
        model retrieves from `datastore`, by default the one it was trained with. CUDA asked for on a
        machine without it: the CPU, with a warning (as the CLI does). On the CPU in fp32 the LM's linear
        layers get oneDNN-prepacked weights (model/packing.py: same tokens, faster decoding); the loaded
        model is then for inference only. `pack_weights=False` keeps the plain layers. `quantize="int8"`
        (CPU, fp32 weights) makes them int8 layers instead (model/quantize.py; no packing then)."""
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("prefixcap: device=%r requested but CUDA is not available; using cpu", str(device))
            device = "cpu"
        if quantize is not None:  # an unknown mode, a GPU or fp16 weights: refused before anything loads
            from prefixcap.model.quantize import check_quantize, quantize_lm
            check_quantize(quantize, device, dtype)
        model = CaptionModel.from_pretrained(path, device=device, dtype=dtype, **hf_kwargs)
        if quantize is not None:
            quantize_lm(model.lm, quantize)  # replaces the linear layers packing would replace
        elif pack_weights:
            pack_linear_layers(model.lm)  # a no-op off the CPU or outside fp32
        from prefixcap.retrieval.inference import retriever_for

        return cls(model, clip_model=clip_model, encoder_dtype=dtype, retriever=retriever_for(model, datastore))

    @property
    def encoder(self) -> ImageEncoder:
        """The CLIP image encoder, loaded lazily so embedding-only use never needs the CLIP weights."""
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    encoder = load_encoder(self.clip_model, device=self.device, dtype=self._encoder_dtype)
                    expected = self.config.mapping.prefix_size
                    if encoder.embedding_dim != expected:
                        raise ValueError(
                            f"CLIP model {self.clip_model!r} gives {encoder.embedding_dim}-d embeddings but "
                            f"the captioner was trained on {expected}-d ones ({self.config.clip_model!r})"
                        )
                    self._encoder = encoder
        return self._encoder

    # --- images -> pixels -> embeddings ------------------------------------------------------
    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One input -> the encoder's (3, H, W) float32 pixels, exactly as the preprocess stage does it."""
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            # A float array is already-preprocessed pixels (what `preprocessor()` returns).
            if image.ndim != 3 or image.shape[0] != 3:
                raise ImageInputError(
                    f"a float tensor input must be preprocessed pixels of shape (3, H, W), got "
                    f"{tuple(image.shape)}; pass raw images as uint8 (H, W, 3) / (3, H, W) or PIL images"
                )
            return np.ascontiguousarray(image, dtype=np.float32)
        image = load_image(image)  # path, bytes, file, PIL image or uint8 array -> upright RGB
        if self._preprocess is None:
            self._preprocess = self.encoder.preprocessor()  # crops extreme aspect ratios before resizing
        return self._preprocess(image)

    def _map(self, fn: Callable, items: Sequence) -> list:
        # PIL decoding/resizing releases the GIL, so a few threads keep the accelerator fed.
        if len(items) <= 1 or self._threads <= 1:
            return [fn(x) for x in items]
        return list(self._prefetch_pool().map(fn, items))

    def load_pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Decode + preprocess a list of inputs in parallel -> (B, 3, H, W) float32 (CPU)."""
        def one(indexed):
            i, img = indexed
            try:
                return self.preprocess(img)
            except ImageInputError as err:
                raise ImageInputError(f"cannot read image {_describe(img, i)}: {err}") from err
            except Exception as err:
                raise ImageInputError(f"cannot read image {_describe(img, i)}: {err}") from err

        return torch.from_numpy(np.stack(self._map(one, list(enumerate(images)))))  # (B, 3, H, W)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> the mapper's input on the device: (B, C) CLIP embeddings, or (B, N, C)
        patch tokens for a token mapper (pooled as in training)."""
        encoder = self.encoder
        with self._lock:
            return self.features(pixels, encoder)

    def features(self, pixels: torch.Tensor, encoder: ImageEncoder | None = None) -> torch.Tensor:
        """encode_pixels without the lock (the caller serialises): (B, C) or (B, N, C) float32."""
        encoder = encoder or self.encoder
        mapping = self.config.mapping
        if not mapping.takes_tokens:
            return encoder.encode_pixels(pixels)  # (B, C)
        if not hasattr(encoder, "encode_patch_tokens"):
            raise ValueError(f"this captioner's {mapping.mapping_type} mapper takes patch tokens, which "
                             f"{type(encoder).__name__} ({self.clip_model}) does not provide")
        return encoder.encode_patch_tokens(pixels, mapping.patch_pool)  # (B, N, C)

    # --- embeddings -> captions --------------------------------------------------------------
    def _generate_kwargs(self, settings: GenerationSettings, return_scores: bool) -> dict[str, Any]:
        k = self.config.prefix_length
        max_new = settings.max_new_tokens or self.config.max_token_length
        if not self.is_seq2seq:
            ctx = _context_length(self.model.lm)
            if ctx is not None and k + max_new > ctx:
                if settings.max_new_tokens is not None:
                    logger.warning("max_new_tokens=%d does not fit the LM's %d positions after the %d-token "
                                   "prefix; using %d", max_new, ctx, k, ctx - k)
                max_new = ctx - k
        kwargs: dict[str, Any] = {
            **settings.generate_kwargs(),
            "max_new_tokens": max_new,
            "eos_token_id": self.eos_token_id,  # training appends exactly this token to every caption
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if return_scores:
            kwargs.update(return_dict_in_generate=True, output_scores=True)
        return kwargs

    @torch.inference_mode()
    def generate(self, embeddings: torch.Tensor | np.ndarray, settings: GenerationSettings | None = None,
                 return_scores: bool = False, **generate_kwargs: Any) -> GenerationOutput:
        """One batch of CLIP embeddings (B, C) (or patch tokens (B, N, C) for a token mapper) -> generated
        token ids; the core of every caption call."""
        # Validated here too: settings built by hand reach generate without any other check.
        settings = (settings or self.settings).validate()
        emb = torch.as_tensor(embeddings).to(self.device)
        expected = self.config.mapping.input_shape  # (C,) or (N, C)
        if tuple(emb.shape[1:]) != expected or emb.ndim != len(expected) + 1:
            what = "patch tokens" if self.config.mapping.takes_tokens else "embeddings"
            raise ValueError(f"{what} must have shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(emb.shape)}")
        kwargs = self._generate_kwargs(settings, return_scores)
        kwargs.update(generate_kwargs)
        with self._lock, warnings.catch_warnings():
            # The prefix has no token ids, so a repetition penalty can only see generated tokens:
            # that is the intended behaviour here, not a problem worth a warning on every call.
            warnings.filterwarnings("ignore", message=".*with `inputs_embeds` and without `input_ids`.*")
            prefix = self.model.prefix(emb)  # (B, K, D)
            attention = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)  # (B, K)
            # Every prefix has exactly K positions, so no padding (left or right) is ever needed.
            if self.retriever is not None:  # [pad ; prefix ; prompt] per row; generate continues after the prompt
                from prefixcap.retrieval.prompt import prompted_inputs

                prompts = self.retriever.prompts(emb.float().cpu().numpy())
                prefix, attention = prompted_inputs(self.model.lm, prefix, prompts)  # (B, L, D), (B, L)
                kwargs["max_new_tokens"] = _fit_context(self.model.lm, prefix.shape[1], kwargs["max_new_tokens"])
            else:
                kwargs.update(self._shared_prefix_cache(prefix, attention, kwargs))
            out = self.model.lm.generate(inputs_embeds=prefix, attention_mask=attention, **kwargs)
        sequences = out.sequences if return_scores else out  # (B*n, T)
        if self.is_seq2seq:
            sequences = sequences[:, 1:]  # drop the decoder start token
        # Decoder-only `generate` from inputs_embeds returns only the new tokens (transformers >= 4.27).
        tokens, lengths = _trim_at_eos(sequences, self.eos_token_id)
        scores = _sequence_scores(self.model.lm, out, lengths, settings) if return_scores else None
        return GenerationOutput(tokens=tokens, scores=scores)

    # `generate` keywords that bring their own cache or prefill (or may change the number of copies
    # per input behind our back): with any of them, `generate` prefills as usual.
    _OWN_PREFILL_KWARGS = frozenset({"cache", "past_key_values", "cache_implementation", "prefill_chunk_size",
                                     "generation_config", "assistant_model", "prompt_lookup_num_tokens",
                                     "custom_generate"})

    def _shared_prefix_cache(self, prefix: torch.Tensor, attention: torch.Tensor,
                             kwargs: dict[str, Any]) -> dict[str, Any]:
        """{cache keyword: the KV cache of the first K-1 prefix positions}, computed once per input and
        repeated for each of its beams / returned sequences; {} where `generate` should prefill by itself.

        `generate` repeats its inputs num_beams (or num_return_sequences) times *before* the prefill,
        so without this the K prefix positions of an input go through the LM once per beam (at beam
        5, K=10 and 20 tokens that is about a third of the LM's work). Given a cache holding K-1
        positions, `generate` runs only the last prefix position per copy: it needs at least one
        position to produce the first logits. The copies of an input are identical until the first
        token, so the result is the same decoding (tokens equal; scores equal to float rounding,
        since the matrix shapes differ). Causal LMs only: a seq2seq `generate` runs the encoder
        before repeating its outputs, and each copy's decoder starts from one start token.
        """
        lm = self.model.lm
        config = lm.generation_config
        copies = max(kwargs.get("num_beams", config.num_beams or 1),
                     kwargs.get("num_return_sequences", config.num_return_sequences or 1))
        if (self.is_seq2seq or copies <= 1 or prefix.shape[1] < 2 or self._OWN_PREFILL_KWARGS & kwargs.keys()
                or getattr(config, "cache_implementation", None) is not None
                or not getattr(lm, "_supports_default_dynamic_cache", lambda: False)()):
            return {}
        from transformers import DynamicCache

        # transformers 5.x renamed the forward's `past_key_values` to `cache`; generate takes either.
        name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

        # The cache generate itself would build (layer types, sliding windows from the config).
        cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
        head_only_last = {"logits_to_keep": 1} if lm._supports_logits_to_keep() else {}  # logits unused
        lm(inputs_embeds=prefix[:, :-1], attention_mask=attention[:, :-1], use_cache=True,
           **{name: cache}, **head_only_last)
        cache.batch_repeat_interleave(copies)  # (B, ...) -> (B*copies, ...), each input's copies adjacent
        return {name: cache}

    def decode(self, tokens: list[list[int]]) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def generate_captions(self, embeddings: torch.Tensor, settings: GenerationSettings, return_scores: bool = False,
                          **generate_kwargs: Any) -> list[tuple[list[str], list[float] | None]]:
        """(B, C) embeddings (or (B, N, C) patch tokens) -> per input its num_return_sequences captions (and scores)."""
        out = self.generate(embeddings, settings, return_scores, **generate_kwargs)
        texts = self.decode(out.tokens)
        n = settings.num_return_sequences
        return [(texts[j * n:(j + 1) * n], out.scores[j * n:(j + 1) * n] if out.scores is not None else None)
                for j in range(len(texts) // n)]

    def caption_embeddings(self, embeddings: torch.Tensor | np.ndarray, batch_size: int = 32,
                           return_scores: bool = False, settings: GenerationSettings | None = None,
                           progress: Callable[[int], None] | None = None, **generation_kwargs: Any):
        """CLIP embeddings (N, C) -> N captions (list[str], or list[list[str]] when
        num_return_sequences > 1); with return_scores, (captions, scores) in the same layout."""
        settings, extra = GenerationSettings.split_kwargs(settings or self.settings, generation_kwargs)
        emb = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
        if emb.ndim == len(self.config.mapping.input_shape):  # one image's (C,) or (N, C)
            emb = emb[None]
        outcomes = []
        for start in range(0, emb.shape[0], batch_size):
            outcomes += self.generate_captions(emb[start:start + batch_size], settings, return_scores, **extra)
            if progress is not None:
                progress(min(batch_size, emb.shape[0] - start))
        return _shape_result(outcomes, return_scores, settings.num_return_sequences)

    def caption(self, images: ImageInput | Iterable[ImageInput], batch_size: int = 32,
                return_scores: bool = False, settings: GenerationSettings | None = None,
                progress: Callable[[int], None] | None = None, **generation_kwargs: Any):
        """Images (paths, PIL images, bytes, uint8 arrays, or preprocessed (3,H,W)/(B,3,H,W) float
        tensors) -> captions, as `caption_embeddings`. A single image gives a one-element list.
        An unreadable image raises ImageInputError naming it (the pipeline module reports it per item instead)."""
        settings, extra = GenerationSettings.split_kwargs(settings or self.settings, generation_kwargs)
        outcomes = []
        # The next batches are decoded in the background while the current one is on the device.
        for pixels in _decoded_batches(self._prefetch_pool(), self._read_image, _as_list(images), batch_size):
            embeddings = self.encode_pixels(pixels).float().to(self.device)  # (b, C) or (b, N, C)
            outcomes += self.generate_captions(embeddings, settings, return_scores, **extra)
            if progress is not None:
                progress(pixels.shape[0])
        return _shape_result(outcomes, return_scores, settings.num_return_sequences)

    def _read_image(self, index: int, image: ImageInput) -> np.ndarray:
        """preprocess, with a failure named by the input (its path, or its position and type)."""
        try:
            return self.preprocess(image)  # (3, H, W)
        except Exception as err:  # noqa: BLE001 - any decoding failure is this input's, re-raised naming it
            raise ImageInputError(f"cannot read image {_describe(image, index)}: "
                                  f"{str(err) or type(err).__name__}") from err

    def _prefetch_pool(self) -> ThreadPoolExecutor:
        """The decoding threads `caption` prefetches batches with (shared with load_pixels)."""
        with self._pools_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="prefixcap-decode")
        return self._pool

    def close(self) -> None:
        """Stop the decoding threads (they are also stopped at interpreter exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._pool = None


# --- helpers -------------------------------------------------------------------------------
def _describe(image: Any, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"{os.fspath(image)!r} (input {index})"
    return f"input {index} ({type(image).__name__})"


def _as_list(images: Any) -> list:
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.dtype != torch.uint8:
        return list(images)  # a (B, 3, H, W) batch of preprocessed pixels
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray, torch.Tensor)):
        return [images]
    return list(images)


def _decoded_batches(pool: ThreadPoolExecutor, read: Callable[[int, Any], np.ndarray], inputs: list,
                     batch_size: int, prefetch: int = 2) -> Iterator[torch.Tensor]:
    """(b, 3, H, W) pixels per batch of inputs, in order, while the next `prefetch` batches decode in `pool`;
    read(index, input) -> (3, H, W) raises for an unreadable input, so the first one of a batch stops here."""
    pending: deque[list[Future]] = deque()

    def resolve(futures: list[Future]) -> torch.Tensor:
        return torch.from_numpy(np.stack([f.result() for f in futures]))  # (b, 3, H, W)

    batch: list[Future] = []
    for i, image in enumerate(inputs):
        batch.append(pool.submit(read, i, image))
        if len(batch) == batch_size:
            pending.append(batch)
            batch = []
            if len(pending) > prefetch:
                yield resolve(pending.popleft())
    if batch:
        pending.append(batch)
    while pending:
        yield resolve(pending.popleft())


def _context_length(lm: torch.nn.Module) -> int | None:
    cfg = lm.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _fit_context(lm: torch.nn.Module, used: int, max_new: int) -> int:
    ctx = _context_length(lm)
    return max(1, min(max_new, ctx - used)) if ctx is not None else max_new


def _trim_at_eos(sequences: torch.Tensor, eos: int) -> tuple[list[list[int]], list[int]]:
    """(N, T) ids -> per row the tokens before the first eos, and the generated length (eos included)."""
    is_eos = sequences == eos  # (N, T)
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, sequences.shape[1],
                                                                            dtype=torch.long))
    rows = sequences.tolist()
    cut = first.tolist()
    lengths = [c + 1 if h else c for c, h in zip(cut, has_eos.tolist())]
    return [r[:c] for r, c in zip(rows, cut)], lengths


def _sequence_scores(lm, out, lengths: list[int], settings: GenerationSettings) -> list[float]:
    if getattr(out, "sequences_scores", None) is not None:  # beam search: its own ranking score
        return out.sequences_scores.float().cpu().tolist()
    # Greedy / sampling: mean log-probability of the generated tokens (eos included).
    step_scores = torch.stack(out.scores, dim=1).float()  # (N, T_new, V) processed logits
    logp = torch.log_softmax(step_scores, dim=-1)
    seq = out.sequences[:, -step_scores.shape[1]:]  # (N, T_new)
    token_logp = logp.gather(-1, seq.unsqueeze(-1)).squeeze(-1)  # (N, T_new)
    n = torch.tensor(lengths, device=token_logp.device).clamp_min(1)
    mask = torch.arange(token_logp.shape[1], device=token_logp.device)[None] < n[:, None]
    return (torch.where(mask, token_logp, 0.0).sum(1) / n).cpu().tolist()


def _shape_result(outcomes: list[tuple[list[str], list[float] | None]], return_scores: bool, n: int):
    """Per-input (captions, scores) -> captions (a list per input when n > 1), plus scores with return_scores."""
    texts: list = [c if n > 1 else c[0] for c, _ in outcomes]
    if not return_scores:
        return texts
    return texts, [s if n > 1 else s[0] for _, s in outcomes]
