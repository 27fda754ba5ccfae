"""Text-only preprocessing (`--text_only`): each caption's CLIP text embedding stored where an image embedding goes.

CapDec / DeCap train a captioner on text alone: CLIP puts texts and images in one space, so the
mapper learns from caption embeddings and captions image embeddings later. Rows are one per
caption (`data.text_only`); a caption longer than the text tower's context is embedded from its
first context-length tokens, as CLIP's tokenizer cuts it, and counted (`clip_text_truncated`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from prefixcap.data.records import InputError

TEXT_TRUNCATED = "clip_text_truncated"  # the conversion name (data.decode.CONVERSIONS) a cut caption counts under


def refuse_image_options(store_patch_tokens: bool, patch_pool: int) -> None:
    """Options that need images have nothing to read in a text-only run: refused in one line."""
    if store_patch_tokens or patch_pool != 1:
        raise InputError("--text_only stores one CLIP text embedding per caption; --store_patch_tokens / "
                         "--patch_pool need images (a text has no patch tokens)")


def text_only_record(encoder: Any) -> dict[str, Any]:
    """The manifest's "text_only" record: what the embeddings are and how long texts were handled."""
    return {"embeddings": "text", "encoder": encoder.spec.name, "context_length": int(encoder.text_context_length),
            "rows": "one per caption", "long_captions": "cut to context_length tokens (counted as "
            f"converted.{TEXT_TRUNCATED})"}


def encode_captions(encoder: Any, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
    """float16 text embeddings (n, C) of the captions, and which were cut to the text tower's context."""
    with torch.inference_mode():
        embeddings = encoder.encode_text(list(texts))  # (n, C) float32, not normalised
    return embeddings.to(torch.float16).cpu().numpy(), encoder.text_truncated(list(texts))
