"""Tiny preprocessed datasets for the train tests, written with the shard format directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prefixcap.data.shards import Manifest, ShardContent, write_shard
from prefixcap.model.language_models import (
    load_tokenizer,
    tokenize_caption,
    tokenizer_fingerprint,
)
from prefixcap.demo.tiny_models import default_corpus


def make_dataset(folder: str | Path, lm_path: str, family: str = "causal", num_images: int = 24,
                 captions_per_image: int = 2, dim: int = 16, num_shards: int = 2, seed: int = 0,
                 prefix_length: int | None = 10, captions: list[str] | None = None, max_token_length: int = 40,
                 manifest_overrides: dict[str, Any] | None = None) -> Path:
    """A complete dataset folder: random (seeded) embeddings, caption-like text tokenized for lm_path.

    Image i gets captions[(i * captions_per_image + j) % len(captions)], j < captions_per_image.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    tokenizer = load_tokenizer(lm_path)
    texts = captions or default_corpus()[::7]
    embeddings = rng.standard_normal((num_images, dim)).astype(np.float32)
    bounds = np.linspace(0, num_images, num_shards + 1).astype(int)
    shards, n_captions = [], 0
    for s in range(num_shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        keys, rows, caps, toks = [], [], [], []
        for i in range(lo, hi):
            keys.append(f"img{i:05d}")
            for j in range(captions_per_image):
                text = texts[(i * captions_per_image + j) % len(texts)]
                rows.append(i - lo)
                caps.append(text)
                toks.append(tokenize_caption(tokenizer, family, text, max_token_length).tokens)
        name = f"{s:05d}"
        write_shard(folder, name, ShardContent(keys, embeddings[lo:hi], rows, caps, toks), {})
        shards.append({"name": name, "num_images": hi - lo, "num_captions": len(caps)})
        n_captions += len(caps)
    manifest = {
        "clip_model": "tiny-clip", "embedding_dim": dim, "normalized": False, "tokenizer": lm_path, "lm_family": family,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "max_token_length": max_token_length,
        "prefix_length": prefix_length, "num_images": num_images, "num_captions": n_captions, "shards": shards,
    }
    manifest.update(manifest_overrides or {})
    Manifest.from_dict(manifest).write(folder)
    return folder
