"""The types every input reader shares: Record, ReaderOptions, ReaderConfig, the Reader protocol, InputError.

Kept apart from the registry (data.readers) so that readers in their own modules
(data.hf_datasets) import these without importing the registry that lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from prefixcap.errors import UsageError


class InputError(UsageError):
    """Raised at start-up for input that cannot be read as asked (path, format, column)."""


@dataclass
class Record:
    """One image with all its captions; the unit that is decoded and encoded once."""

    key: str
    image: bytes | str | None  # encoded bytes, or a local file path the worker reads, or None (missing)
    captions: list[Any]  # raw captions (str or bytes); cleaned by decode.decode_caption
    embedding: np.ndarray | None = None  # (C,) precomputed (embeddings input): no decoding at all
    reason: str | None = None  # set when the reader already knows the record must be skipped


@dataclass
class ReaderOptions:
    """How to read a dataset input; one type for preprocess, caption and evaluate (same flag names)."""

    wds_image_key: str = "jpg"
    wds_caption_key: str = "txt"
    wds_caption_in_metadata: bool = False
    cache_path: str | None = None
    image_column: str = "image_path"
    caption_column: str | None = "caption"  # None: captions are not needed (the caption stage)
    key_column: str | None = None
    image_root: str | None = None
    coco_split: str | None = None
    # Hugging Face datasets (--input_format hf_dataset). None defaults keep older settings.json comparable.
    hf_split: str | None = None  # None: "train", or the dataset's only split
    hf_config: str | None = None  # the dataset's configuration (load_dataset's `name`)
    hf_streaming: bool | None = None  # stream shard by shard instead of downloading / memory-mapping


@dataclass
class ReaderConfig:
    """What one reader reads: the inputs, their format, the options, and the chunk size of listed inputs."""

    inputs: list[str]
    input_format: str = "files"
    options: ReaderOptions = field(default_factory=ReaderOptions)
    samples_per_shard: int = 10000


class Reader(Protocol):
    """A deterministic list of work units, each iterated as records in a fixed order."""

    def units(self) -> list[str]:
        """Names of the work units (input shards), in input order; ranks split this list."""

    def unit_size(self, unit: int) -> int | None:
        """Number of records in a unit when known without reading it (for the progress bar)."""

    def records(self, unit: int) -> Iterator[Record]:
        """The unit's records, always in the same order (resume skips a counted prefix)."""
