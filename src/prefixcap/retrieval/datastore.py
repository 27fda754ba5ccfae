"""A built datastore: open it (checked), search it by CLIP image embedding, and turn hits into prompts.

A datastore folder (written by `prefixcap datastore build`, prefixcap.retrieval.build) holds
  manifest.json      written last: CLIP model, embedding width, count, index type (complete when present)
  captions.arrow     one row per caption: key (the image or line it came from), caption; memory-mapped
  embeddings.f32     (count, C) float32 L2-normalised CLIP text embeddings, raw row-major; memory-mapped
  index.faiss        the FAISS index over those rows (inner product = cosine similarity)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from prefixcap.errors import UsageError
from prefixcap.retrieval.prompt import RetrievalSettings, prompt_tokens

DATASTORE = "prefixcap-datastore"  # the manifest's "format" marker
MANIFEST = "manifest.json"
CAPTIONS = "captions.arrow"
EMBEDDINGS = "embeddings.f32"
INDEX = "index.faiss"
INDEX_TYPES = ("flat", "ivf", "hnsw")
Exclude = str | Collection[str] | None  # a query's own key(s): its captions are never retrieved for it


class DatastoreError(UsageError):
    """A datastore that cannot be used as asked (missing, empty, of another CLIP model or width): exit 2."""


@dataclass
class DatastoreManifest:
    """manifest.json of a datastore: what made it and what it holds."""

    clip_model: str
    embedding_dim: int
    count: int
    index_type: str = "flat"
    inputs: list[str] = field(default_factory=list)
    input_format: str = ""
    created_at: str = ""
    format: str = DATASTORE
    format_version: int = 1

    @classmethod
    def read(cls, folder: str | Path) -> DatastoreManifest:
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise DatastoreError(f"datastore {folder}: the folder does not exist (write one with "
                                 "prefixcap datastore build --output_dir ...)")
        if not path.is_file():
            raise DatastoreError(f"datastore {folder}: {MANIFEST} is missing (not a datastore, or its build "
                                 "did not finish; rerun prefixcap datastore build)")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != DATASTORE:
                raise ValueError(f"format is {data.get('format')!r}, expected {DATASTORE!r}")
            return cls(**data)
        except (ValueError, TypeError) as err:
            raise DatastoreError(f"datastore {folder}: unreadable {MANIFEST}: {err}") from err

    def identity(self) -> str:
        """What this datastore is, wherever its folder lies: a hash of its manifest (a rebuild or an --append
        changes it, a copy keeps it)."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]


class Datastore:
    """Captions + FAISS index, opened read-only; `search` is thread-safe (FAISS search is)."""

    def __init__(self, folder: str | Path):
        import faiss

        self.path = Path(folder)
        self.manifest = DatastoreManifest.read(self.path)
        if self.manifest.count == 0:
            raise DatastoreError(f"datastore {self.path}: it is empty (0 captions); build it from an input with "
                                 "captions")
        for name in (CAPTIONS, INDEX):
            if not (self.path / name).is_file():
                raise DatastoreError(f"datastore {self.path}: {name} is missing; rebuild it with "
                                     "prefixcap datastore build")
        try:
            self.index = faiss.read_index(str(self.path / INDEX), faiss.IO_FLAG_MMAP)
        except RuntimeError:  # index types FAISS cannot memory-map are read into memory
            self.index = faiss.read_index(str(self.path / INDEX))
        self._table = pa.ipc.open_file(pa.memory_map(str(self.path / CAPTIONS))).read_all()
        counts = {"manifest": self.manifest.count, INDEX: self.index.ntotal, CAPTIONS: self._table.num_rows}
        if len(set(counts.values())) != 1 or self.index.d != self.manifest.embedding_dim:
            raise DatastoreError(f"datastore {self.path}: its files disagree (counts {counts}, index width "
                                 f"{self.index.d} vs {self.manifest.embedding_dim}); rebuild it")
        self._captions = self._table.column("caption")
        self._keys = self._table.column("key")

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    def caption(self, i: int) -> str:
        return self._captions[int(i)].as_py()

    def key(self, i: int) -> str:
        return self._keys[int(i)].as_py()

    def check_width(self, dim: int, what: str) -> None:
        if dim != self.embedding_dim:
            raise DatastoreError(f"datastore {self.path} holds {self.embedding_dim}-d CLIP embeddings "
                                 f"({self.manifest.clip_model}) but {what} has {dim}-d ones")

    def search(self, queries: np.ndarray, k: int, exclude_keys: list[Exclude] | None = None) -> list[list[int]]:
        """(B, C) image embeddings -> per row the rows of its k most similar captions (best first),
        skipping captions whose key is the row's exclude key (the image's own captions)."""
        return [[i for i, _ in row] for row in self.scored_search(queries, k, exclude_keys)]

    def scored_search(self, queries: np.ndarray, k: int,
                      exclude_keys: list[Exclude] | None = None) -> list[list[tuple[int, float]]]:
        """`search` with each hit's score: (row, cosine similarity of the image and the caption) pairs, best first.

        A row's exclude key is one key or a collection of keys (None: nothing excluded for that row)."""
        q = np.asarray(queries, np.float32).reshape(len(queries), -1)  # (B, C); the caller's array is never changed
        self.check_width(q.shape[1], "the query")
        q = np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12))
        fetch = min(len(self), k if exclude_keys is None else k + 16)
        while True:
            scores, ids = self.index.search(q, fetch)  # (B, fetch) each; id -1 where fewer hits
            out = [self._keep(row, scores[i], k, None if exclude_keys is None else exclude_keys[i])
                   for i, row in enumerate(ids)]
            if fetch >= len(self) or all(len(r) == k for r in out):
                return out
            fetch = min(len(self), fetch * 4)  # many own captions among the hits: look further

    def _keep(self, row: np.ndarray, scores: np.ndarray, k: int, exclude: Exclude) -> list[tuple[int, float]]:
        hits = [(int(i), float(s)) for i, s in zip(row, scores) if i >= 0]
        if exclude is not None:
            excluded = {exclude} if isinstance(exclude, str) else set(exclude)
            hits = [(i, s) for i, s in hits if self.key(i) not in excluded]
        return hits[:k]


class Retrieved(NamedTuple):
    """One retrieved caption: its text, its cosine similarity to the query image and the key it is stored under."""

    caption: str
    score: float
    key: str


class Retriever:
    """A datastore plus a model's retrieval settings: image embeddings -> prompt token ids."""

    def __init__(self, datastore: Datastore, settings: RetrievalSettings, tokenizer: Any):
        self.datastore = datastore
        self.settings = settings
        self.tokenizer = tokenizer
        self._local = threading.local()  # .log: the list `recording` collects into, per thread

    def retrieve(self, embeddings: np.ndarray, exclude_keys: list[Exclude] | None = None) -> list[list[Retrieved]]:
        """(B, C) -> per image its k retrieved captions with their scores, most similar first."""
        store = self.datastore
        rows = [[Retrieved(store.caption(i), s, store.key(i)) for i, s in hits]
                for hits in store.scored_search(embeddings, self.settings.k, exclude_keys)]
        log = getattr(self._local, "log", None)
        if log is not None:
            log.extend(rows)
        return rows

    def captions(self, embeddings: np.ndarray, exclude_keys: list[Exclude] | None = None) -> list[list[str]]:
        """(B, C) -> per image its k retrieved captions."""
        return [[r.caption for r in row] for row in self.retrieve(embeddings, exclude_keys)]

    def prompts(self, embeddings: np.ndarray, exclude_keys: list[Exclude] | None = None) -> list[list[int]]:
        """(B, C) -> per image the prompt's token ids."""
        return [prompt_tokens(self.tokenizer, caps, self.settings) for caps in self.captions(embeddings, exclude_keys)]

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[list[Retrieved]]]:
        """Collect what this thread retrieves inside the block: one list of Retrieved per image, in order.

        A Captioner builds its prompts from `retrieve`, so this shows the very captions a batch's prompts
        were made of, without retrieving a second time (serve's batcher uses it). Other threads are not seen.
        """
        previous = getattr(self._local, "log", None)
        self._local.log = log = []
        try:
            yield log
        finally:
            self._local.log = previous


def open_datastore(folder: str | Path, clip_model: str | None = None, dim: int | None = None,
                   what: str = "the model") -> Datastore:
    """Open a datastore and check it against the CLIP embeddings it will be queried with."""
    store = Datastore(folder)
    if dim is not None:
        store.check_width(dim, f"{what} ({clip_model})" if clip_model else what)
    return store
