"""The preprocessed-dataset format: Arrow shards + manifest, written atomically, read memory-mapped.

A dataset folder holds
  manifest.json                    written last; its presence means the dataset is complete
  settings.json                    encoder/tokenizer settings; a rerun with other settings is refused
  shards/{name}.images.arrow       one row per image: key, embedding (float16, fixed size C), and with
                                   --store_patch_tokens patch_tokens (float16, fixed size N*C, row-major
                                   (N, C); the manifest's "patch_tokens" record gives N, C and the pooling)
  shards/{name}.captions.arrow     one row per caption: image_row (row in the images file),
                                   caption (text), tokens (list<int32>, ends with end-of-text)
  shards/{name}.json               the shard's stats; written after both Arrow files, so a shard is
                                   complete exactly when this file exists (img2dataset's rule)
All files are written to a temporary name and renamed into place (prefixcap.runs.atomic_write_bytes).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from prefixcap.runs import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARD_DIR = "shards"


@dataclass
class ShardEntry:
    """One complete shard as the manifest lists it."""

    name: str
    num_images: int
    num_captions: int


@dataclass
class Manifest:
    """manifest.json: what made a preprocessed dataset and what it holds; the one type every stage reads.

    The header (encoder, tokenizer, lengths) is known before any shard is written; the counts are
    filled in from the shards' stats when every rank has finished (`preprocess.progress.try_write_manifest`).
    """

    # --- what made it ---
    clip_model: str = "unknown"  # as the user named it (an alias like ViT-B/32, a Hub id or a folder)
    embedding_dim: int = 0
    normalized: bool = False  # embeddings are unit-norm (clip-retrieval input): train warns about it
    tokenizer: str | None = None  # the LM tokenizer the captions were tokenized with
    lm_family: str | None = None  # causal | seq2seq
    tokenizer_fingerprint: dict[str, Any] | None = None  # train refuses a different tokenizer
    max_token_length: int | None = None
    prefix_length: int | None = None  # only the default of train's --prefix_length
    input_format: str | None = None
    hub_datasets: list[str] = field(default_factory=list)  # Hub dataset ids read (model cards cite them)
    patch_tokens: dict[str, Any] | None = None  # {"num_tokens", "dim", "pool", "source"} with --store_patch_tokens
    # --text_only: {"embeddings": "text", "encoder", "context_length", "rows": "one per caption"}; None: image embeddings
    text_only: dict[str, Any] | None = None
    created_by: str | None = None
    created_at: str | None = None
    # --- what it holds ---
    num_images: int = 0
    num_captions: int = 0
    num_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # per skip reason
    converted: dict[str, int] = field(default_factory=dict)  # per conversion (kept images)
    num_truncated: int = 0
    shards: list[ShardEntry] = field(default_factory=list)
    world_size: int = 1
    format_version: int = FORMAT_VERSION
    # Keys this version does not know (written by a newer prefixcap or a tool): kept on rewrite.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data

    # Code written when the manifest was the dict manifest.json holds (`ds.manifest["clip_model"]`).
    def __getitem__(self, key: str) -> Any:
        """The value under `key` as manifest.json holds it (shards as dicts); KeyError for an absent key."""
        if key in self.extra:
            return self.extra[key]
        if key == "extra" or key not in _MANIFEST_FIELDS:
            raise KeyError(key)
        value = getattr(self, key)
        return [asdict(s) for s in value] if key == "shards" else value

    def get(self, key: str, default: Any = None) -> Any:
        """dict.get: the value under `key` as manifest.json holds it, or `default`."""
        try:
            return self[key]
        except KeyError:
            return default

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST) -> Manifest:
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{where} has format_version {version!r}; this prefixcap reads up to "
                             f"{FORMAT_VERSION} (upgrade prefixcap)")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["shards"] = [ShardEntry(s["name"], int(s["num_images"]), int(s["num_captions"]))
                            for s in values.get("shards", [])]
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the dataset folder is damaged") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object; the dataset folder is damaged")
        return cls.from_dict(data, str(path))

    def write(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / MANIFEST, self.to_dict())


_MANIFEST_FIELDS = frozenset(f.name for f in fields(Manifest))


def _write_arrow(path: Path, table: pa.Table) -> None:
    # One record batch per file keeps every column a single contiguous, zero-copy buffer.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks(), max_chunksize=max(table.num_rows, 1))
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


@dataclass
class ShardContent:
    """What one shard holds before it is written."""

    keys: list[str]  # one per image
    embeddings: np.ndarray  # (N_images, C) any float dtype; stored as float16
    image_rows: list[int]  # one per caption: row in keys/embeddings
    captions: list[str]
    tokens: list[list[int]]
    patch_tokens: np.ndarray | None = None  # (N_images, N, C) with --store_patch_tokens; stored as float16


def write_shard(folder: str | Path, name: str, content: ShardContent, stats: dict[str, Any]) -> Path:
    """Write one shard atomically; the stats json is written last and marks it complete."""
    shard_dir = Path(folder) / SHARD_DIR
    n_img, dim = content.embeddings.shape if len(content.keys) else (0, content.embeddings.shape[-1])
    assert n_img == len(content.keys), "one embedding per image key"
    assert len(content.image_rows) == len(content.captions) == len(content.tokens)
    emb = np.ascontiguousarray(content.embeddings, dtype=np.float16).reshape(-1)
    columns = {
        "key": pa.array(content.keys, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb, pa.float16()), dim),
    }
    if content.patch_tokens is not None:
        assert content.patch_tokens.shape[0] == n_img, "one token set per image key"
        flat = np.ascontiguousarray(content.patch_tokens, dtype=np.float16)
        width = int(np.prod(flat.shape[1:]))
        columns["patch_tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), width)
        stats = {**stats, "patch_tokens_shape": list(content.patch_tokens.shape[1:])}
    images = pa.table(columns)
    captions = pa.table({
        "image_row": pa.array(content.image_rows, pa.int32()),
        "caption": pa.array(content.captions, pa.string()),
        "tokens": pa.array(content.tokens, pa.list_(pa.int32())),
    })
    _write_arrow(shard_dir / f"{name}.images.arrow", images)
    _write_arrow(shard_dir / f"{name}.captions.arrow", captions)
    stats = {**stats, "name": name, "num_images": n_img, "num_captions": len(content.captions),
             "embedding_dim": int(dim)}
    atomic_write_json(shard_dir / f"{name}.json", stats)
    return shard_dir / f"{name}.json"


def shard_keys(folder: str | Path, name: str) -> list[str]:
    """The image keys a shard holds (its images file's key column only)."""
    path = Path(folder) / SHARD_DIR / f"{name}.images.arrow"
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all().column("key").to_pylist()


def completed_shards(folder: str | Path) -> dict[str, dict[str, Any]]:
    """name -> stats of every complete shard (those whose stats json exists), sorted by name."""
    shard_dir = Path(folder) / SHARD_DIR
    if not shard_dir.is_dir():
        return {}
    out = {}
    for stats_path in sorted(shard_dir.glob("*.json")):
        out[stats_path.stem] = json.loads(stats_path.read_text())
    return out


@dataclass
class Sample:
    """One caption with its image embedding."""

    index: int  # global caption index
    key: str  # source key of the image
    caption: str
    tokens: np.ndarray  # (T,) int32, ends with end-of-text
    embedding: np.ndarray  # (C,) float32
    image_index: int  # global image index
    patch_tokens: np.ndarray | None = None  # (N, C) float32 when the dataset stores them


class _Shard:
    """Zero-copy numpy views over one shard's memory-mapped Arrow files."""

    def __init__(self, folder: Path, name: str):
        images = pa.ipc.open_file(pa.memory_map(str(folder / f"{name}.images.arrow"))).read_all()
        captions = pa.ipc.open_file(pa.memory_map(str(folder / f"{name}.captions.arrow"))).read_all()
        self.name = name
        self.keys = images.column("key").chunk(0) if images.num_rows else pa.array([], pa.string())
        emb = images.column("embedding")
        dim = emb.type.list_size
        self.embeddings = (emb.chunk(0).values.to_numpy(zero_copy_only=True).reshape(-1, dim)
                           if images.num_rows else np.zeros((0, dim), np.float16))  # (N_images, C) float16
        self.patch_tokens = None  # (N_images, N*C) float16 view, when stored
        if "patch_tokens" in images.column_names:
            col = images.column("patch_tokens")
            width = col.type.list_size
            self.patch_tokens = (col.chunk(0).values.to_numpy(zero_copy_only=True).reshape(-1, width)
                                 if images.num_rows else np.zeros((0, width), np.float16))
        if captions.num_rows:
            toks = captions.column("tokens").chunk(0)
            self.offsets = toks.offsets.to_numpy(zero_copy_only=True)  # (N_captions + 1,) int32
            self.token_values = toks.values.to_numpy(zero_copy_only=True)  # (sum T,) int32
            self.image_rows = captions.column("image_row").chunk(0).to_numpy(zero_copy_only=True)
            self.captions = captions.column("caption").chunk(0)
        else:
            self.offsets = np.zeros(1, np.int32)
            self.token_values = np.zeros(0, np.int32)
            self.image_rows = np.zeros(0, np.int32)
            self.captions = pa.array([], pa.string())
        self.num_images = images.num_rows
        self.num_captions = captions.num_rows


class PreprocessedDataset(Sequence):
    """A sized, indexable view of a preprocessed folder; opening it costs near-constant memory."""

    def __init__(self, path: str | Path, require_complete: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            if require_complete:
                raise FileNotFoundError(
                    f"{self.path} is not a complete preprocessed dataset: {MANIFEST} is missing "
                    "(was preprocessing interrupted? rerun the same command to finish it)"
                )
            self.manifest = Manifest()
            names = list(completed_shards(self.path))
        else:
            self.manifest = Manifest.read(self.path)
            names = [s.name for s in self.manifest.shards]
        self._shards = [_Shard(self.path / SHARD_DIR, n) for n in names]
        self._caption_starts = np.cumsum([0] + [s.num_captions for s in self._shards])
        self._image_starts = np.cumsum([0] + [s.num_images for s in self._shards])
        if self._shards:
            self.embedding_dim = int(self._shards[0].embeddings.shape[1])
        else:
            self.embedding_dim = int(self.manifest.embedding_dim)
        record = self.manifest.patch_tokens
        self.patch_token_shape = (int(record["num_tokens"]), int(record["dim"])) if record else None

    # --- captions (the training samples) ---
    def __len__(self) -> int:
        return int(self._caption_starts[-1])

    def _locate(self, index: int) -> tuple[_Shard, int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"caption index {index} out of range for {len(self)} captions")
        s = bisect_right(self._caption_starts, index) - 1
        return self._shards[s], s, index - int(self._caption_starts[s])

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        shard, s, row = self._locate(int(index))
        image_row = int(shard.image_rows[row])
        return Sample(
            index=int(index) if index >= 0 else int(index) + len(self),
            key=shard.keys[image_row].as_py(),
            caption=shard.captions[row].as_py(),
            tokens=np.asarray(shard.token_values[shard.offsets[row]:shard.offsets[row + 1]]),
            embedding=np.asarray(shard.embeddings[image_row], dtype=np.float32),
            image_index=int(self._image_starts[s]) + image_row,
            patch_tokens=self._patch_tokens(shard, image_row),
        )

    def _patch_tokens(self, shard: _Shard, row: int) -> np.ndarray | None:
        if shard.patch_tokens is None or self.patch_token_shape is None:
            return None
        return np.asarray(shard.patch_tokens[row], dtype=np.float32).reshape(self.patch_token_shape)  # (N, C)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def tokens_and_embedding(self, index: int, column: str = "embedding") -> tuple[np.ndarray, np.ndarray, int]:
        """The fast path for training: (tokens (T,), embedding (C,) float16 view, image index);
        column "patch_tokens" gives the image's flat (N*C,) float16 patch tokens instead."""
        shard, s, row = self._locate(int(index))
        image_row = int(shard.image_rows[row])
        values = shard.embeddings if column == "embedding" else shard.patch_tokens
        if values is None:
            raise ValueError(f"{self.path} stores no {column} (preprocess it with --store_patch_tokens)")
        return (shard.token_values[shard.offsets[row]:shard.offsets[row + 1]], values[image_row],
                int(self._image_starts[s]) + image_row)

    def lengths(self) -> np.ndarray:
        """(N_captions,) int32 token counts, for length-grouped batching."""
        if not self._shards:
            return np.zeros(0, np.int32)
        return np.concatenate([np.diff(s.offsets) for s in self._shards]).astype(np.int32)

    def caption_image_indices(self) -> np.ndarray:
        """(N_captions,) int64 global image index of every caption (for per-image splits)."""
        if not self._shards:
            return np.zeros(0, np.int64)
        return np.concatenate([s.image_rows.astype(np.int64) + int(self._image_starts[i])
                               for i, s in enumerate(self._shards)])

    # --- images (for evaluation: references grouped by image) ---
    @property
    def num_images(self) -> int:
        return int(self._image_starts[-1])

    def image(self, image_index: int) -> tuple[str, np.ndarray]:
        """(key, embedding (C,) float32) of a global image index."""
        s = bisect_right(self._image_starts, image_index) - 1
        shard, row = self._shards[s], image_index - int(self._image_starts[s])
        return shard.keys[row].as_py(), np.asarray(shard.embeddings[row], dtype=np.float32)

    def image_patch_tokens(self, image_index: int) -> np.ndarray:
        """(N, C) float32 patch tokens of a global image index (datasets with --store_patch_tokens)."""
        s = bisect_right(self._image_starts, image_index) - 1
        tokens = self._patch_tokens(self._shards[s], image_index - int(self._image_starts[s]))
        if tokens is None:
            raise ValueError(f"{self.path} stores no patch tokens (preprocess it with --store_patch_tokens)")
        return tokens

    def references(self) -> dict[int, list[str]]:
        """global image index -> all its captions (several references per image)."""
        refs: dict[int, list[str]] = {}
        for i, shard in enumerate(self._shards):
            base = int(self._image_starts[i])
            for row, caption in zip(shard.image_rows, shard.captions.to_pylist()):
                refs.setdefault(base + int(row), []).append(caption)
        return refs


def load_preprocessed(path: str | Path) -> PreprocessedDataset:
    """Open a preprocessed dataset folder (memory-mapped); see the module docstring for the layout."""
    return PreprocessedDataset(path)
