"""Retrieval at train time: each training image's prompt, computed once per run, the batches that carry it,
and the Retriever of validation CIDEr (the validation images' own captions left out).

`train --datastore DS --retrieval_k K` retrieves, for every image of the dataset, its K nearest
captions by image-to-text similarity, leaving out the image's own captions (same key), and stores
the prompts' token ids in `{output_dir}/retrieval/` (memory-mapped, reused by a resumed run), so a
training step costs the same as without retrieval apart from the longer LM input.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from prefixcap.errors import UsageError
from prefixcap.retrieval.datastore import Datastore, Retriever, open_datastore
from prefixcap.retrieval.prompt import RetrievalSettings, prompted_targets
from prefixcap.runs import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)
FOLDER = "retrieval"


class RetrievalBatch(NamedTuple):
    """A training batch whose tokens are [prompt ; caption] per row; the loss is taken on target_mask only."""

    embeddings: torch.Tensor  # (B, C)
    tokens: torch.Tensor  # (B, T) int64, right-padded
    mask: torch.Tensor  # (B, T) 1 on prompt and caption tokens
    target_mask: torch.Tensor  # (B, T) 1 on caption tokens only


def _fingerprint(store: Datastore, settings: RetrievalSettings, data) -> str:
    what = {"datastore": str(store.path.resolve()), "count": len(store), "created": store.manifest.created_at,
            "k": settings.k, "format": settings.prompt_format, "max": settings.max_caption_tokens,
            "data": str(Path(data.path).resolve()), "images": data.num_images}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def image_prompts(retriever: Retriever, data, batch_size: int = 1024, progress: bool = True) -> list[list[int]]:
    """Per image of a PreprocessedDataset: its prompt token ids, its own captions (same key) excluded."""
    from tqdm import tqdm

    prompts: list[list[int]] = []
    bar = tqdm(total=data.num_images, unit="image", desc="retrieval", disable=not progress, dynamic_ncols=True)
    for start in range(0, data.num_images, batch_size):
        rows = [data.image(i) for i in range(start, min(start + batch_size, data.num_images))]
        keys = [k for k, _ in rows]
        prompts += retriever.prompts(np.stack([e for _, e in rows]), exclude_keys=keys)  # (b, C) queries
        bar.update(len(rows))
    bar.close()
    return prompts


def stored_prompts(retriever: Retriever, data, folder: Path, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids int32, offsets (N_images + 1,) int64), read memory-mapped from `folder` or computed once."""
    key = _fingerprint(retriever.datastore, retriever.settings, data)
    info = folder / "info.json"
    if not (info.is_file() and json.loads(info.read_text()).get("fingerprint") == key):
        prompts = image_prompts(retriever, data, progress=progress)
        offsets = np.cumsum([0] + [len(p) for p in prompts]).astype(np.int64)
        flat = np.fromiter((t for p in prompts for t in p), np.int32, int(offsets[-1]))
        atomic_write_bytes(folder / "tokens.i32", flat.tobytes())
        atomic_write_bytes(folder / "offsets.i64", offsets.tobytes())
        atomic_write_json(info, {"fingerprint": key, "num_images": len(prompts), "num_tokens": int(offsets[-1]),
                                 "datastore": str(retriever.datastore.path), "k": retriever.settings.k})
    offsets = np.fromfile(folder / "offsets.i64", np.int64)
    flat = (np.memmap(folder / "tokens.i32", np.int32, mode="r") if offsets[-1] else np.zeros(0, np.int32))
    return flat, offsets


class RetrievalCaptionDataset(torch.utils.data.Dataset):
    """A CaptionDataset whose samples also carry their image's retrieval prompt: (tokens, embedding, prompt)."""

    def __init__(self, base, flat: np.ndarray, offsets: np.ndarray):
        self.base = base
        self.data, self.path, self.manifest = base.data, base.path, base.manifest
        self.flat, self.offsets = flat, offsets
        self.image_of = base.data.caption_image_indices()  # (N_captions,) int64

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens, emb = self.base[index]
        image = int(self.image_of[int(index)])
        return tokens, emb, np.asarray(self.flat[self.offsets[image]:self.offsets[image + 1]])

    def __getitems__(self, indices: list[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [self[i] for i in indices]

    @staticmethod
    def collate(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> RetrievalBatch:
        tokens, mask, target = prompted_targets([p.tolist() for _, _, p in samples], [t.tolist() for t, _, _ in samples])
        embeddings = np.stack([e for _, e, _ in samples])  # (B, C)
        return RetrievalBatch(torch.from_numpy(embeddings), torch.from_numpy(tokens), torch.from_numpy(mask),
                              torch.from_numpy(target))


class OwnCaptionsLeftOut(Retriever):
    """A model's Retriever for known images (training's validation CIDEr): each image's own captions (its key)
    are left out, as in training, so a datastore that holds them cannot make the score optimistic.

    A Captioner retrieves with embeddings alone, so each query is matched back to its image by its
    embedding (cosine >= MATCH to a known one; several near-identical images: all their keys are left out).
    A query that matches none is an error, never a silent retrieval with the own captions in.
    """

    MATCH = 0.999

    def __init__(self, retriever: Retriever, keys: list[str], embeddings: np.ndarray):
        super().__init__(retriever.datastore, retriever.settings, retriever.tokenizer)
        known = np.asarray(embeddings, np.float32).reshape(len(keys), -1)  # (N, C)
        self._known = known / np.maximum(np.linalg.norm(known, axis=1, keepdims=True), 1e-12)
        self._keys = np.asarray(keys, dtype=object)

    def own_keys(self, embeddings: np.ndarray) -> list[list[str]]:
        """(B, C) queries -> per query the keys of the known images it is (one, unless images are duplicates)."""
        q = np.asarray(embeddings, np.float32).reshape(len(embeddings), -1)  # (B, C)
        sims = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)) @ self._known.T  # (B, N)
        if len(q) and (not self._known.size or sims.max(axis=1).min() < self.MATCH):
            best = float(sims.max(axis=1).min()) if self._known.size else float("nan")
            raise ValueError(f"a retrieval query matches none of the {len(self._keys)} known images (best cosine "
                             f"{best:.4f} < {self.MATCH}), so its own captions cannot be left out")
        return [list(self._keys[row >= self.MATCH]) for row in sims]

    def retrieve(self, embeddings, exclude_keys=None):
        return super().retrieve(embeddings, self.own_keys(embeddings) if exclude_keys is None else exclude_keys)


def with_retrieval(base, datastore: str, k: int, output_dir: str, flag: str = "--datastore",
                   progress: bool = True, subfolder: str = "train") -> RetrievalCaptionDataset:
    """Wrap a CaptionDataset with its images' prompts (computed once into {output_dir}/retrieval/{subfolder})."""
    from prefixcap.model.language_models import load_tokenizer

    manifest = base.manifest
    if k < 1:
        raise UsageError(f"--retrieval_k must be at least 1, got {k}")
    if manifest.lm_family not in (None, "causal"):
        raise UsageError(f"{flag}: retrieval prompts need a causal LM; {base.path} was tokenized for a "
                         f"{manifest.lm_family} LM")
    if base.features != "embedding":
        raise UsageError(f"{flag}: retrieval queries with the pooled CLIP embedding; a patch-token mapper "
                         "cannot be combined with it")
    store = open_datastore(datastore, manifest.clip_model, int(manifest.embedding_dim or base.data.embedding_dim),
                           what=f"the dataset {base.path}")
    if _clip_name(store.manifest.clip_model) != _clip_name(str(manifest.clip_model)):
        logger.warning(f"notice: {flag} {datastore} was built with CLIP model {store.manifest.clip_model!r}, the "
                       f"dataset with {manifest.clip_model!r} (same width; make sure they are the same model)")
    tokenizer = load_tokenizer(str(manifest.tokenizer))
    retriever = Retriever(store, settings(datastore, k), tokenizer)
    flat, offsets = stored_prompts(retriever, base.data, Path(output_dir) / FOLDER / subfolder, progress)
    return RetrievalCaptionDataset(base, flat, offsets)


def _clip_name(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def settings(datastore: str, k: int) -> RetrievalSettings:
    """The settings a model trained with this datastore records (the datastore as an absolute path)."""
    return RetrievalSettings(k=k, datastore=str(Path(datastore).resolve()))
