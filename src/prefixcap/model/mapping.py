"""Mapping networks: a CLIP vector (B, C) or CLIP patch tokens (B, N, C) -> prefix (B, K, D).

ClipCap's MLP and transformer mappers take the pooled vector; `transformer_tokens` (the transformer
mapper with the projected patch tokens as its clip tokens) and `projector` (LLaVA-style per-token MLP,
K = N) take the encoder's final patch tokens (see prefixcap.model.patch_tokens for which tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MappingConfig:
    """Everything that fixes a mapper's architecture (saved with the model)."""

    mapping_type: str = "mlp"  # key of MAPPERS
    prefix_size: int = 512  # C: CLIP embedding size
    lm_dim: int = 768  # D: LM embedding width
    prefix_length: int = 10  # K
    clip_length: int | None = None  # L: transformer mapper's clip tokens (defaults to K)
    num_layers: int = 8
    num_heads: int = 8
    mlp_ratio: float = 2.0
    # Token mappers only: N tokens per image (CLS + pooled patch grid) and the P x P average pooling
    # they were made with, so captioning from images computes exactly the tokens training saw.
    num_tokens: int | None = None
    patch_pool: int = 1

    @property
    def clip_tokens(self) -> int:
        return self.clip_length or self.prefix_length

    @property
    def takes_tokens(self) -> bool:
        return self.mapping_type in TOKEN_MAPPERS

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image's mapper input: (C,) or (N, C)."""
        if self.takes_tokens:
            return (int(self.num_tokens or 0), self.prefix_size)
        return (self.prefix_size,)


class MLPMapper(nn.Module):
    """ClipCap's MLP: Linear(C, D*K/2) -> Tanh -> Linear(D*K/2, D*K), reshaped to (B, K, D)."""

    def __init__(self, cfg: MappingConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.lm_dim * cfg.prefix_length // 2
        self.model = nn.Sequential(
            nn.Linear(cfg.prefix_size, hidden),
            nn.Tanh(),
            nn.Linear(hidden, cfg.lm_dim * cfg.prefix_length),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).view(x.shape[0], self.cfg.prefix_length, self.cfg.lm_dim)  # (B, K, D)


class MultiHeadAttention(nn.Module):
    """ClipCap's attention: bias-free query and joint key/value projections, biased output, no mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"LM width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.to_queries(x).view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, hd)
        kv = self.to_keys_values(x).view(b, n, 2, h, d // h)  # keys first, then values, per head
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, N, hd)
        # Same math as the original explicit softmax(q k^T / sqrt(hd)) v, through the fused kernel.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.project(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + Attn(LN(x)), then x + MLP(LN(x)) with ReLU and mlp ratio 2."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerMapper(nn.Module):
    """ClipCap's TransformerMapper: L clip tokens + K learned queries -> layers -> last K outputs."""

    def __init__(self, cfg: MappingConfig):
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.prefix_size, cfg.clip_tokens * cfg.lm_dim)
        self.prefix_const = nn.Parameter(torch.randn(cfg.prefix_length, cfg.lm_dim))
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.lm_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        clip_tokens = self.linear(x).view(b, self.cfg.clip_tokens, self.cfg.lm_dim)  # (B, L, D)
        queries = self.prefix_const.unsqueeze(0).expand(b, -1, -1)  # (B, K, D)
        h = torch.cat((clip_tokens, queries), dim=1)  # (B, L+K, D); no positional embeddings
        for layer in self.layers:
            h = layer(h)
        return h[:, self.cfg.clip_tokens:]  # (B, K, D)


class TokenTransformerMapper(TransformerMapper):
    """The transformer mapper on patch tokens: Linear(C, D) per token -> N clip tokens + K queries -> K outputs.

    Same layers as ClipCap's (no positional embeddings in the layers); a learned position embedding
    is added to the N projected tokens, since attention alone cannot tell which patch a token came
    from and the patch's place is exactly what the pooled vector loses.
    """

    def __init__(self, cfg: MappingConfig):
        _require_tokens(cfg)
        # With one "clip token" the parent's linear is Linear(C, D): here it projects every patch token.
        super().__init__(MappingConfig(**{**cfg.__dict__, "clip_length": 1}))
        self.cfg = cfg
        self.positions = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.lm_dim))
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = _check_tokens(x, self.cfg)
        clip_tokens = self.linear(x) + self.positions  # (B, N, D)
        queries = self.prefix_const.unsqueeze(0).expand(b, -1, -1)  # (B, K, D)
        h = torch.cat((clip_tokens, queries), dim=1)  # (B, N+K, D)
        for layer in self.layers:
            h = layer(h)
        return h[:, n:]  # (B, K, D)


class TokenProjector(nn.Module):
    """LLaVA-style projector: Linear(C, D) -> GELU -> Linear(D, D) on every token; K = N prefix positions."""

    def __init__(self, cfg: MappingConfig):
        super().__init__()
        _require_tokens(cfg)
        if cfg.prefix_length != cfg.num_tokens:
            raise ValueError(f"the projector's prefix length is its number of tokens: prefix_length "
                             f"{cfg.prefix_length} != num_tokens {cfg.num_tokens}")
        self.cfg = cfg
        self.model = nn.Sequential(nn.Linear(cfg.prefix_size, cfg.lm_dim), nn.GELU(),
                                   nn.Linear(cfg.lm_dim, cfg.lm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.cfg)
        return self.model(x)  # (B, N, D); the LM's own positions tell the tokens apart


def _require_tokens(cfg: MappingConfig) -> None:
    if not cfg.num_tokens or cfg.num_tokens < 1:
        raise ValueError(f"mapping_type {cfg.mapping_type!r} takes patch tokens: num_tokens must be set "
                         "(from a dataset preprocessed with --store_patch_tokens)")


def _check_tokens(x: torch.Tensor, cfg: MappingConfig) -> tuple[int, int, int]:
    if x.ndim != 3 or x.shape[1:] != (cfg.num_tokens, cfg.prefix_size):
        raise ValueError(f"mapping_type {cfg.mapping_type!r} expects patch tokens of shape "
                         f"(B, {cfg.num_tokens}, {cfg.prefix_size}), got {tuple(x.shape)}")
    return tuple(x.shape)  # type: ignore[return-value]


MAPPERS: dict[str, type[nn.Module]] = {"mlp": MLPMapper, "transformer": TransformerMapper,
                                       "transformer_tokens": TokenTransformerMapper, "projector": TokenProjector}
TOKEN_MAPPERS = frozenset({"transformer_tokens", "projector"})  # these take (B, N, C) patch tokens


def build_mapper(cfg: MappingConfig) -> nn.Module:
    if cfg.mapping_type not in MAPPERS:
        raise ValueError(f"unknown mapping_type {cfg.mapping_type!r}; expected one of {', '.join(MAPPERS)}")
    return MAPPERS[cfg.mapping_type](cfg)


def with_token_input(cfg: MappingConfig, patch_tokens: dict | None, where: str) -> MappingConfig:
    """Fill a token mapper's num_tokens / patch_pool (and the projector's K = N) from a dataset's
    manifest record of its patch tokens; a pooled-vector mapper is returned unchanged."""
    if not cfg.takes_tokens:
        return cfg
    if not patch_tokens:
        raise ValueError(f"--mapping_type {cfg.mapping_type} takes patch tokens, but {where} holds only pooled "
                         "embeddings; preprocess it again with --store_patch_tokens")
    n = int(patch_tokens["num_tokens"])
    k = n if cfg.mapping_type == "projector" else cfg.prefix_length
    return MappingConfig(**{**cfg.__dict__, "num_tokens": n, "patch_pool": int(patch_tokens["pool"]),
                            "prefix_length": k})
