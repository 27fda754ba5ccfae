"""CLIP-style image (and text) encoders behind one interface, with OpenAI name aliases."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch
from PIL import Image

from prefixcap.data.images import bound_aspect
from prefixcap.errors import UsageError
from prefixcap.model.hub import check_reachable

# OpenAI CLIP names (as the original ClipCap and the seed use them) -> Hugging Face model ids.
# Names with no Hugging Face port (the ResNet CLIPs) are only reachable through open_clip.
OPENAI_TO_HF: dict[str, str] = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
OPENAI_WITHOUT_HF: tuple[str, ...] = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
OPEN_CLIP_PREFIX = "open_clip:"


class UnknownEncoderError(UsageError):
    """Raised for an encoder name that cannot be resolved."""


@dataclass(frozen=True)
class EncoderSpec:
    """A resolved encoder address: which backend loads it and from where."""

    backend: str  # "hf" or "open_clip"
    name: str  # HF id / local folder, or "ARCH/PRETRAINED" for open_clip
    requested: str  # what the user wrote, kept for manifests and reports


def list_encoder_aliases() -> list[str]:
    return sorted(OPENAI_TO_HF)


def resolve_encoder(name: str) -> EncoderSpec:
    """Map a user-facing encoder name to a backend and a loadable identifier."""
    if name.startswith(OPEN_CLIP_PREFIX):
        return EncoderSpec("open_clip", name[len(OPEN_CLIP_PREFIX):], name)
    if name in OPENAI_TO_HF:
        return EncoderSpec("hf", OPENAI_TO_HF[name], name)
    if name in OPENAI_WITHOUT_HF:
        raise UnknownEncoderError(
            f"CLIP model {name!r} has no Hugging Face port; supported OpenAI names are "
            f"{', '.join(list_encoder_aliases())}. For {name} install the open_clip extra "
            f"(pip install 'prefixcap[open_clip]') and use --clip_model 'open_clip:{name}/openai'."
        )
    if os.path.isdir(name):
        return EncoderSpec("hf", name, name)
    if re.fullmatch(r"(ViT-[A-Za-z]+/\d+.*|RN\d+.*)", name):  # an OpenAI-style name, but not a known one
        raise UnknownEncoderError(
            f"unknown OpenAI CLIP name {name!r}: the OpenAI names are {', '.join(list_encoder_aliases())} "
            f"(and {', '.join(OPENAI_WITHOUT_HF)} through open_clip); a Hugging Face id looks like org/name")
    if "/" in name:
        return EncoderSpec("hf", name, name)
    raise UnknownEncoderError(
        f"unknown CLIP model {name!r}: expected an OpenAI name ({', '.join(list_encoder_aliases())}), "
        "a Hugging Face CLIP/SigLIP model id (org/name), a local model folder, "
        "or 'open_clip:ARCH/PRETRAINED'."
    )


class ImageEncoder(Protocol):
    """What every encoder backend provides."""

    spec: EncoderSpec
    embedding_dim: int
    device: torch.device

    def preprocessor(self) -> Callable[[Image.Image], np.ndarray]:
        """A picklable function RGB image -> float32 array (3, H, W); runs in worker processes."""

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, C) float32 image embeddings (not normalised)."""

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of B strings -> (B, C) float32 text embeddings (not normalised)."""


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput from get_*_features; older versions a tensor.
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


class HFPreprocessor:
    """Picklable wrapper of a Hugging Face image processor (the encoder's own resize/crop/normalise)."""

    def __init__(self, processor: Any):
        self.processor = processor
        # A shortest-edge resize scales the long side along (S x S*aspect pixels): crop extreme
        # aspect ratios first. A fixed (height, width) resize is bounded already and keeps the
        # whole picture, squashed, so it must see the whole image.
        size = getattr(processor, "size", None)  # a dict, or a SizeDict in transformers 5
        shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        self.bound = shortest is not None

    def fit(self, image: Image.Image) -> Image.Image:
        """The image as the processor's resize should see it (extreme aspect ratios cropped)."""
        return bound_aspect(image) if self.bound else image

    def __call__(self, image: Image.Image) -> np.ndarray:
        out = self.processor(images=self.fit(image), return_tensors="np")
        return np.asarray(out["pixel_values"][0], dtype=np.float32)  # (3, H, W)


def _image_processor_kwargs() -> dict[str, Any]:
    # Without torchvision transformers falls back to the PIL backend with a warning; ask for it.
    return {} if importlib.util.find_spec("torchvision") else {"backend": "pil"}


class HFClipEncoder:
    """Any Hugging Face dual encoder with get_image_features/get_text_features (CLIP, SigLIP)."""

    def __init__(self, spec: EncoderSpec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 pack_weights: bool = True, **hf_kwargs: Any):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from prefixcap.model.packing import pack_linear_layers

        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        try:
            check_reachable(spec.name)  # a missing folder / unreachable Hub: at once, not after retries
            self.model = AutoModel.from_pretrained(spec.name, dtype=self.dtype, **hf_kwargs)
        except (OSError, ValueError) as err:
            raise UnknownEncoderError(f"cannot load CLIP model {spec.requested!r} ({spec.name}): {err}") from err
        if not hasattr(self.model, "get_image_features"):
            raise UnknownEncoderError(
                f"{spec.requested!r} loads as {type(self.model).__name__}, which is not a CLIP-style "
                "dual encoder (no get_image_features)"
            )
        self.model.eval().requires_grad_(False).to(self.device)
        if pack_weights:  # fp32 on the CPU only: the same features to float rounding, ~1.1x faster (ANALYSIS.md)
            pack_linear_layers(self.model)
        self.image_processor = AutoImageProcessor.from_pretrained(spec.name, **_image_processor_kwargs(), **hf_kwargs)
        self._tokenizer = None
        self._tokenizer_loader = lambda: AutoTokenizer.from_pretrained(spec.name, **hf_kwargs)
        cfg = self.model.config
        self.embedding_dim = int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)

    def preprocessor(self) -> HFPreprocessor:
        return HFPreprocessor(self.image_processor)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        return _features(self.model.get_image_features(pixel_values=pixels)).float()  # (B, C)

    # Patch tokens (prefixcap.model.patch_tokens says which tokens and how they are pooled).
    def patch_token_shape(self, pool: int = 1) -> tuple[int, int]:
        """(N, C): tokens per image after P x P pooling, and their width (the embedding size)."""
        from prefixcap.model.patch_tokens import grid_size, num_tokens, vision_parts

        vision_parts(self.model)  # a clear error for a model without a CLIP vision tower
        return num_tokens(grid_size(self.model), pool), self.embedding_dim

    def encode_pixels_with_tokens(self, pixels: torch.Tensor, pool: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (pooled (B, C), patch tokens (B, N, C)), float32, from one vision forward."""
        from prefixcap.model.patch_tokens import encode_with_tokens

        return encode_with_tokens(self.model, pixels.to(self.device, self.dtype, non_blocking=True), pool)

    def encode_patch_tokens(self, pixels: torch.Tensor, pool: int = 1) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, C) float32 patch tokens (token 0 is the pooled embedding)."""
        return self.encode_pixels_with_tokens(pixels, pool)[1]

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_loader()
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return _features(self.model.get_text_features(**batch)).float()  # (B, C)

    @property
    def text_context_length(self) -> int:
        """Tokens the text tower reads (start and end tokens included); longer texts are cut to it."""
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 77))

    def text_truncated(self, texts: list[str]) -> list[bool]:
        """Which texts encode_text cuts to the text tower's context."""
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_loader()
        ids = self._tokenizer(texts, truncation=False)["input_ids"]
        return [len(row) > self.text_context_length for row in ids]


class OpenClipPreprocessor:
    """Picklable open_clip image transform producing (3, H, W) float32 arrays."""

    def __init__(self, transform: Any):
        self.transform = transform
        self.bound = _resizes_shortest_edge(transform)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.transform(bound_aspect(image) if self.bound else image).numpy().astype(np.float32)


def _resizes_shortest_edge(transform: Any) -> bool:
    """True unless the transform's first Resize squashes to a fixed (h, w) (bounded already)."""
    for step in getattr(transform, "transforms", [transform]):
        if type(step).__name__ == "Resize":
            size = getattr(step, "size", None)
            return not (isinstance(size, (tuple, list)) and len(size) == 2)
    return True


class OpenClipEncoder:
    """LAION / OpenAI weights through open_clip (optional extra)."""

    def __init__(self, spec: EncoderSpec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 **_: Any):
        try:
            import open_clip
        except ImportError as err:
            raise UnknownEncoderError(
                f"{spec.requested!r} needs open_clip: pip install 'prefixcap[open_clip]'"
            ) from err
        arch, _, pretrained = spec.name.partition("/")
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.transform = transform
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.embedding_dim = int(self.model.text_projection.shape[-1])

    def preprocessor(self) -> OpenClipPreprocessor:
        return OpenClipPreprocessor(self.transform)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float()

    @property
    def text_context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def text_truncated(self, texts: list[str]) -> list[bool]:
        encode = getattr(self.tokenizer, "encode", None)  # BPE ids without the start/end tokens
        return [encode is not None and len(encode(t)) + 2 > self.text_context_length for t in texts]


BACKENDS: dict[str, type] = {"hf": HFClipEncoder, "open_clip": OpenClipEncoder}


def load_encoder(name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 pack_weights: bool = True, **hf_kwargs: Any) -> ImageEncoder:
    """Load an encoder by OpenAI alias, HF id, local folder or 'open_clip:ARCH/PRETRAINED', for inference.

    A Hugging Face encoder in fp32 on the CPU gets oneDNN-prepacked linear layers (model/packing.py: the
    same features to float rounding, ~1.1x faster); `pack_weights=False` keeps transformers' layers."""
    spec = resolve_encoder(name)
    if spec.backend == "hf":
        hf_kwargs["pack_weights"] = pack_weights
    return BACKENDS[spec.backend](spec, device=device, dtype=dtype, **hf_kwargs)


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (keepdim: the seed's version broadcast wrongly without it)."""
    return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
