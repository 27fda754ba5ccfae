"""CLIP patch tokens: which ViT tokens a token mapper sees, how they are pooled, and what storing them costs.

Which tokens: the vision transformer's final hidden states (B, 1 + g*g, H) -- CLS first, then the
g x g patch grid in row-major order -- put through the same post-LayerNorm and `visual_projection`
that turn the CLS state into the pooled CLIP embedding. So every token lives in the pooled vector's
C-dimensional space, token 0 *is* the pooled embedding (same computation), and a dataset's tokens
cost C (not H) values each. LLaVA instead feeds raw (penultimate-layer) hidden states; the projected
final layer is what ClipCap-style prefixes already consume, and for ViT-B/32 it is 512 rather than 768
values per token.

Pooling (`patch_pool` P > 1): P x P average pooling of the patch grid (edge blocks of a grid that P
does not divide average the patches they have), CLS kept: N = 1 + ceil(g/P)^2 tokens. ViT-B/32 at
224 px: g = 7, P = 1 -> 50 tokens, P = 2 -> 1 + 4*4 = 17 tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

TOKEN_SOURCE = "vision final layer, post-LayerNorm + visual_projection (CLS first, then the patch grid)"


class PatchTokensUnsupportedError(ValueError):
    """The encoder has no CLIP-style vision tower (CLS + patch grid + projection) to take tokens from."""


def num_tokens(grid: int, pool: int) -> int:
    """Tokens per image: CLS plus the pooled g x g grid."""
    if pool < 1:
        raise ValueError(f"--patch_pool must be at least 1, got {pool}")
    return 1 + math.ceil(grid / pool) ** 2


def pool_patch_tokens(tokens: torch.Tensor, pool: int) -> torch.Tensor:
    """(B, 1 + g*g, C) -> (B, 1 + ceil(g/P)^2, C): P x P average pooling of the grid, CLS kept."""
    if pool == 1:
        return tokens
    b, n, c = tokens.shape
    grid = math.isqrt(n - 1)
    if grid * grid != n - 1:
        raise ValueError(f"{n - 1} patch tokens do not form a square grid")
    patches = tokens[:, 1:].transpose(1, 2).reshape(b, c, grid, grid)  # (B, C, g, g)
    pooled = F.avg_pool2d(patches, pool, pool, ceil_mode=True, count_include_pad=False)  # (B, C, g', g')
    return torch.cat((tokens[:, :1], pooled.flatten(2).transpose(1, 2)), dim=1)  # (B, 1 + g'^2, C)


def vision_parts(model: Any) -> tuple[Any, Any, Any]:
    """(vision_model, post_layernorm, visual_projection) of a Hugging Face CLIP model, or a clear error."""
    vision = getattr(model, "vision_model", None)
    norm = getattr(vision, "post_layernorm", None)
    projection = getattr(model, "visual_projection", None)
    if vision is None or norm is None or projection is None:
        raise PatchTokensUnsupportedError(
            f"{type(model).__name__} has no CLIP-style vision tower (vision_model.post_layernorm + "
            "visual_projection); patch tokens are supported for Hugging Face CLIP models")
    return vision, norm, projection


def grid_size(model: Any) -> int:
    """g: patches per side of the model's input image."""
    cfg = model.config.vision_config
    return int(cfg.image_size) // int(cfg.patch_size)


@torch.inference_mode()
def encode_with_tokens(model: Any, pixels: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One vision forward -> (pooled (B, C), tokens (B, N, C)), both float32.

    The pooled embedding is computed exactly as `get_image_features` does (projected pooler output),
    so datasets with and without stored tokens hold the same embedding.
    """
    vision, norm, projection = vision_parts(model)
    out = vision(pixel_values=pixels, return_dict=True)
    pooled = projection(out.pooler_output)  # (B, C)
    tokens = projection(norm(out.last_hidden_state))  # (B, 1 + g*g, C)
    return pooled.float(), pool_patch_tokens(tokens.float(), pool)  # (B, C), (B, N, C)


def storage_bytes(num_images: int, tokens: int, dim: int) -> int:
    """Bytes the float16 patch tokens of num_images images take on disk."""
    return 2 * num_images * tokens * dim


def describe_storage(record: dict[str, Any], num_images: int) -> str:
    """One summary line: tokens per image and the disk they take beside the pooled embeddings."""
    n, c = int(record["num_tokens"]), int(record["dim"])
    total = storage_bytes(num_images, n, c)
    return (f"patch tokens: {n} x {c} float16 per image (pool {record['pool']}), {total / 2**20:.1f} MiB "
            f"for {num_images} images ({n}x the pooled embeddings' {2 * c * num_images / 2**20:.1f} MiB)")
