"""CapDec's noise injection: Gaussian noise on the normalised CLIP embedding while a text-trained mapper learns.

A mapper trained on caption *text* embeddings must later read *image* embeddings, which sit apart
from the texts in CLIP's space (the modality gap). Nukrai et al. (CapDec, 2022) add zero-mean
Gaussian noise of variance 0.016 per dimension to the unit-norm text embedding during training, so
the mapper learns to map a neighbourhood of each text, wide enough to take in the image of it.
"""

from __future__ import annotations

import torch

CAPDEC_VARIANCE = 0.016  # the paper's best variance on normalised ViT-B/32 embeddings (512-d)


def add_noise(embeddings: torch.Tensor, variance: float) -> torch.Tensor:
    """embeddings (B, C) + N(0, variance) per element (std = sqrt(variance))."""
    return embeddings + torch.randn_like(embeddings) * variance ** 0.5  # (B, C)
