"""Training batches from preprocessed shards: row reads, per-batch padding, length-grouped sampling.

Memory does not grow with the dataset: rows are read with `os.pread` from the shard files instead
of through the memory maps, so the pages a training epoch touches stay in the OS page cache and
are never counted in the process's resident memory (a memory-mapped page that was read once stays
in RSS). The per-caption state kept in memory is a few numpy integers per caption (lengths, the
epoch's permutation), never a Python object per sample.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prefixcap.data.shards import SHARD_DIR, PreprocessedDataset, load_preprocessed


class Batch(NamedTuple):
    """One training batch; tokens are right-padded to the longest caption in the batch."""

    embeddings: torch.Tensor  # (B, C) float16, as stored; (B, N, C) patch tokens for token mappers
    tokens: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) int64, 1 on real caption tokens


@dataclass(frozen=True)
class _ShardFiles:
    """Where one shard's columns live inside its two Arrow files (byte offsets)."""

    images_path: str
    captions_path: str
    dim: int
    embeddings_at: int  # float16 (N_images, C) values
    offsets_at: int  # int32 (N_captions + 1,) token offsets
    tokens_at: int  # int32 token values
    image_rows_at: int  # int32 (N_captions,)
    num_captions: int


def _file_offsets(path: Path) -> tuple[pa.Table, int]:
    """The table of an Arrow file read zero-copy, and the address its memory map starts at."""
    mm = pa.memory_map(str(path))
    table = pa.ipc.open_file(mm).read_all()
    mm.seek(0)
    base = mm.read_buffer(1).address if mm.size() else 0
    return table, base


def _locate_shard(folder: Path, name: str, column: str = "embedding") -> _ShardFiles | None:
    """Byte offsets of the columns of one shard; None if the layout is not the plain one we write.

    column "patch_tokens" reads the image's flat (N*C,) patch tokens where the embedding would be.
    """
    images_path = folder / f"{name}.images.arrow"
    captions_path = folder / f"{name}.captions.arrow"
    images, ibase = _file_offsets(images_path)
    captions, cbase = _file_offsets(captions_path)
    if captions.num_rows == 0:  # nothing is ever read from it
        return _ShardFiles(str(images_path), str(captions_path), 0, 0, 0, 0, 0, 0)
    emb_col, tok_col, row_col = images.column(column), captions.column("tokens"), captions.column("image_row")
    if any(c.num_chunks != 1 for c in (emb_col, tok_col, row_col)):
        return None
    emb, toks, rows = emb_col.chunk(0), tok_col.chunk(0), row_col.chunk(0)
    if emb.offset or toks.offset or rows.offset or emb.values.offset or toks.values.offset:
        return None
    return _ShardFiles(
        images_path=str(images_path), captions_path=str(captions_path), dim=emb.type.list_size,
        embeddings_at=emb.values.buffers()[1].address - ibase,
        offsets_at=toks.buffers()[1].address - cbase,
        tokens_at=toks.buffers()[3].address - cbase,
        image_rows_at=rows.buffers()[1].address - cbase,
        num_captions=captions.num_rows,
    )


class _RowReader:
    """Reads (tokens, embedding) of a caption with pread: no mapped page stays resident."""

    def __init__(self, shards: list[_ShardFiles], caption_starts: np.ndarray):
        self.shards = shards
        self.caption_starts = caption_starts
        self._fds: dict[str, int] = {}
        self._pid = -1

    def __getstate__(self):  # file descriptors are per process; workers reopen them
        return {"shards": self.shards, "caption_starts": self.caption_starts}

    def __setstate__(self, state):
        self.__init__(state["shards"], state["caption_starts"])

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = int(np.searchsorted(self.caption_starts, index, side="right")) - 1
        row = index - int(self.caption_starts[s])
        f = self.shards[s]
        cap = self._fd(f.captions_path)
        start, end = np.frombuffer(os.pread(cap, 8, f.offsets_at + 4 * row), np.int32)
        tokens = np.frombuffer(os.pread(cap, 4 * int(end - start), f.tokens_at + 4 * int(start)), np.int32)
        image_row = int(np.frombuffer(os.pread(cap, 4, f.image_rows_at + 4 * row), np.int32)[0])
        emb = np.frombuffer(os.pread(self._fd(f.images_path), 2 * f.dim, f.embeddings_at + 2 * f.dim * image_row),
                            np.float16)
        return tokens, emb


class CaptionDataset(Dataset):
    """Caption i -> (tokens (T,) int32, embedding (C,) float16) of a preprocessed dataset.

    features "patch_tokens": the image's (N, C) float16 patch tokens instead of its embedding.
    """

    def __init__(self, data: str | Path | PreprocessedDataset, features: str = "embedding"):
        self.data = data if isinstance(data, PreprocessedDataset) else load_preprocessed(data)
        self.path = self.data.path
        self.manifest = self.data.manifest
        self.features = features
        self._shape: tuple[int, ...] | None = None  # (N, C) for patch tokens
        if features == "patch_tokens":
            if self.data.patch_token_shape is None:
                raise ValueError(f"{self.path} stores no patch tokens (preprocess it with --store_patch_tokens)")
            self._shape = self.data.patch_token_shape
        elif features != "embedding":
            raise ValueError(f"features must be 'embedding' or 'patch_tokens', got {features!r}")
        self._reader = self._make_reader()

    def _make_reader(self) -> _RowReader | None:
        names = [s.name for s in self.manifest.shards]
        located = [_locate_shard(self.path / SHARD_DIR, n, self.features) for n in names]
        if not names or any(f is None for f in located):
            return None  # empty shards or an unusual layout: use the memory-mapped path
        shards = [f for f in located if f is not None]
        reader = _RowReader(shards, np.cumsum([0] + [f.num_captions for f in shards]).astype(np.int64))
        if int(reader.caption_starts[-1]) != len(self.data):
            return None
        # Check the offsets once against the memory-mapped reader (first and last caption).
        for i in {0, len(self.data) - 1}:
            tokens, emb, _ = self.data.tokens_and_embedding(i, self.features)
            t2, e2 = reader.read(i)
            if not (np.array_equal(tokens, t2) and np.array_equal(emb, e2)):
                return None
        return reader

    def __len__(self) -> int:
        return len(self.data)

    def __getstate__(self):
        # Workers started by spawn get only the row reader and the path; the Arrow tables are
        # reopened (never pickled, which would copy them).
        return {"path": str(self.path), "reader": self._reader, "features": self.features, "shape": self._shape}

    def __setstate__(self, state):
        self.data = load_preprocessed(state["path"])
        self.path, self.manifest, self._reader = self.data.path, self.data.manifest, state["reader"]
        self.features, self._shape = state.get("features", "embedding"), state.get("shape")

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._reader is not None:
            tokens, emb = self._reader.read(int(index))
        else:
            tokens, emb, _ = self.data.tokens_and_embedding(int(index), self.features)
            tokens, emb = np.array(tokens), np.array(emb)
        return tokens, (emb.reshape(self._shape) if self._shape else emb)  # (C,) or (N, C)

    def __getitems__(self, indices: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self[i] for i in indices]


def collate(samples: list[tuple[np.ndarray, np.ndarray]]) -> Batch:
    """Stack embeddings and right-pad tokens to the longest caption of this batch only."""
    longest = max(len(t) for t, _ in samples)
    tokens = np.zeros((len(samples), longest), np.int64)  # pad id is irrelevant: masked out
    mask = np.zeros((len(samples), longest), np.int64)
    for i, (t, _) in enumerate(samples):
        tokens[i, :len(t)] = t
        mask[i, :len(t)] = 1
    embeddings = np.stack([e for _, e in samples])  # (B, C) float16
    return Batch(torch.from_numpy(embeddings), torch.from_numpy(tokens), torch.from_numpy(mask))


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar-length captions, identical for a given (seed, epoch).

    Each epoch: a permutation of all captions (across shards), cut into mega-batches of
    `mega_batch_mult` batches, each sorted by length and cut into batches (so padding is small
    while each batch still mixes shards and images), then the batch order is shuffled. Ranks take
    every `num_replicas`-th batch; the last few are reused so every rank runs the same number of
    steps. `set_epoch(epoch, start=k)` resumes an epoch at this rank's k-th batch.
    """

    def __init__(self, indices: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, group_by_length: bool = True, mega_batch_mult: int = 50):
        if batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
        if len(indices) == 0:
            raise ValueError("no captions to train on (the training split is empty)")
        self.indices = np.asarray(indices, np.int64)  # (N,) dataset indices
        self.lengths = np.asarray(lengths, np.int32)  # (N,) aligned with indices
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.group_by_length, self.mega_batch_mult = group_by_length, mega_batch_mult
        self.num_global_batches = math.ceil(len(self.indices) / batch_size)
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        """Batches per rank per epoch."""
        return math.ceil(self.num_global_batches / self.num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.indices))  # (N,) positions into self.indices
        if self.group_by_length:
            mega = np.arange(len(perm)) // (self.batch_size * self.mega_batch_mult)
            perm = perm[np.lexsort((-self.lengths[perm], mega))]  # longest first inside each mega-batch
        return perm, rng.permutation(self.num_global_batches)

    def __iter__(self) -> Iterator[list[int]]:
        perm, batch_order = self._order()
        bs = self.batch_size
        for j in range(self.start, len(self)):
            g = (j * self.num_replicas + self.rank) % self.num_global_batches
            b = int(batch_order[g])
            yield self.indices[perm[b * bs:(b + 1) * bs]].tolist()


class SequentialBatchSampler(Sampler[list[int]]):
    """Evaluation batches: captions sorted by length, every `num_replicas`-th batch for this rank."""

    def __init__(self, indices: np.ndarray, lengths: np.ndarray, batch_size: int, num_replicas: int = 1,
                 rank: int = 0):
        order = np.argsort(-np.asarray(lengths), kind="stable")
        self.indices = np.asarray(indices, np.int64)[order]
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank

    def __iter__(self) -> Iterator[list[int]]:
        starts = range(self.rank * self.batch_size, len(self.indices), self.batch_size * self.num_replicas)
        for s in starts:
            yield self.indices[s:s + self.batch_size].tolist()

    def __len__(self) -> int:
        return len(range(self.rank * self.batch_size, len(self.indices), self.batch_size * self.num_replicas))


def split_by_image(data: PreprocessedDataset, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) caption indices; all captions of an image land on the same side."""
    n = len(data)
    if val_fraction <= 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, np.int64)
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    images = data.caption_image_indices()  # (N,)
    num_images = data.num_images
    n_val = max(1, round(val_fraction * num_images))
    if n_val >= num_images:
        raise ValueError(f"--val_fraction {val_fraction} leaves no training images out of {num_images}")
    is_val = np.zeros(num_images, bool)
    is_val[np.random.default_rng([seed, 12345]).choice(num_images, n_val, replace=False)] = True
    caption_is_val = is_val[images]
    return np.flatnonzero(~caption_is_val).astype(np.int64), np.flatnonzero(caption_is_val).astype(np.int64)


def make_loader(dataset: CaptionDataset, batch_sampler: Sampler, num_workers: int, pin_memory: bool,
                seed: int) -> DataLoader:
    """A DataLoader over batch indices; its own generator so it never draws from the global RNG."""
    return DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=getattr(dataset, "collate", collate), num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
