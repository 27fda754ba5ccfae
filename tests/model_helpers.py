"""Tiny captioning artifacts for the caption-side tests: a random mapper and a re-randomised LM, saved."""

from __future__ import annotations

from pathlib import Path

import torch

from prefixcap.model import CaptionConfig, CaptionModel
from prefixcap.model.adapters import LoraSettings
from prefixcap.model.mapping import MappingConfig

C = 16  # the tiny CLIP's embedding size
K = 4  # prefix length of the test models


def build_artifact(path: Path, clip: str, lm: str, family: str, mapping_type: str = "mlp",
                   normalize_prefix: bool = False, seed: int = 0, std: float | None = 0.5,
                   max_token_length: int = 12, mapping: MappingConfig | None = None,
                   lora: LoraSettings | None = None) -> Path:
    """A CaptionModel with random mapper weights and a 'fine-tuned' (re-randomised, larger) LM, saved at `path`.

    The tiny LMs' default init (std 0.02, `std=None` keeps it) makes every step predict the same token;
    std 0.5 gives varied token sequences so that token-for-token comparisons actually test something.
    """
    torch.manual_seed(seed)
    config = CaptionConfig(
        clip_model=clip, language_model=lm, lm_family=family, normalize_prefix=normalize_prefix,
        mapping=mapping or MappingConfig(mapping_type=mapping_type, prefix_size=C, prefix_length=K, num_layers=1,
                                         num_heads=2),
        only_prefix=False, max_token_length=max_token_length, lora=lora,
    )
    model = CaptionModel(config)
    with torch.no_grad():
        for p in model.lm.parameters():
            if p.ndim >= 2 and std is not None:
                p.normal_(0, std)
    return model.save_pretrained(path)
