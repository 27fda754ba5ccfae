"""Mapping networks (ClipCap's MLP and transformer mappers): CLIP vector (B, C) -> prefix (B, K, D)."""

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

    @property
    def clip_tokens(self) -> int:
        return self.clip_length or self.prefix_length


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


MAPPERS: dict[str, type[nn.Module]] = {"mlp": MLPMapper, "transformer": TransformerMapper}


def build_mapper(cfg: MappingConfig) -> nn.Module:
    if cfg.mapping_type not in MAPPERS:
        raise ValueError(f"unknown mapping_type {cfg.mapping_type!r}; expected one of {', '.join(MAPPERS)}")
    return MAPPERS[cfg.mapping_type](cfg)
