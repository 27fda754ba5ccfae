"""Input readers: each turns one input format into work units of per-image records (image + all its captions)."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_EXTENSIONS = {"parquet": (".parquet",), "csv": (".csv", ".tsv"), "jsonl": (".jsonl", ".json")}


class InputError(ValueError):
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
class ReaderConfig:
    """Everything the readers need to know about the input."""

    inputs: list[str]
    input_format: str = "files"
    wds_image_key: str = "jpg"
    wds_caption_key: str = "txt"
    wds_caption_in_metadata: bool = False
    cache_path: str | None = None
    image_column: str = "image_path"
    caption_column: str = "caption"
    key_column: str | None = None
    image_root: str | None = None
    coco_split: str | None = None
    samples_per_shard: int = 10000


class Reader(Protocol):
    """A deterministic list of work units, each iterated as records in a fixed order."""

    def units(self) -> list[str]:
        """Names of the work units (input shards), in input order; ranks split this list."""

    def unit_size(self, unit: int) -> int | None:
        """Number of records in a unit when known without reading it (for the progress bar)."""

    def records(self, unit: int) -> Iterator[Record]:
        """The unit's records, always in the same order (resume skips a counted prefix)."""


def is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Brace-expand each input ("{000..123}.tar" -> 124 names), keeping order."""
    from braceexpand import braceexpand

    if isinstance(inputs, str):
        inputs = [inputs]
    out: list[str] = []
    for item in inputs:
        out.extend(braceexpand(item))
    return out


def _local_files(inputs: list[str], extensions: tuple[str, ...], what: str, flag: str = "--input_dataset") -> list[Path]:
    """Expand inputs into existing local files: folders are searched recursively, sorted."""
    files: list[Path] = []
    for item in expand_inputs(inputs):
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in extensions and p.is_file())
            if not found:
                raise InputError(f"{flag} folder {item!r} holds no {what} files ({', '.join(extensions)})")
            files.extend(found)
        elif path.is_file():
            if not os.access(path, os.R_OK):
                raise InputError(f"{flag} file {item!r} is not readable")
            files.append(path)
        else:
            raise InputError(f"{flag} path {item!r} does not exist (expected a {what} file or a folder of them)")
    if not files:
        raise InputError(f"{flag} names no {what} files")
    return files


class _ChunkedReader:
    """Base for inputs listed up front (files, tables, COCO): units are chunks of samples_per_shard images."""

    items: list[tuple[str, Any, list[Any]]]  # (key, image path/bytes/None, captions)
    chunk: int

    def units(self) -> list[str]:
        n = max(1, -(-len(self.items) // self.chunk))
        return [f"images[{i * self.chunk}:{min((i + 1) * self.chunk, len(self.items))}]" for i in range(n)]

    def unit_size(self, unit: int) -> int | None:
        return len(self.items[unit * self.chunk:(unit + 1) * self.chunk])

    def records(self, unit: int) -> Iterator[Record]:
        for key, image, captions in self.items[unit * self.chunk:(unit + 1) * self.chunk]:
            if image is None:
                yield Record(key, None, captions, reason="missing_image")
            else:
                yield Record(key, image, captions)


class WebDatasetReader:
    """webdataset tars (local paths, folders, brace patterns, URLs, pipe:); one unit per tar."""

    def __init__(self, cfg: ReaderConfig):
        self.cfg = cfg
        self.urls: list[str] = []
        for item in expand_inputs(cfg.inputs):
            if is_remote(item):
                self.urls.append(item)
            elif Path(item).is_dir():
                tars = sorted(str(p) for p in Path(item).rglob("*.tar"))
                if not tars:
                    raise InputError(f"--input_dataset folder {item!r} holds no .tar files")
                self.urls.extend(tars)
            elif Path(item).is_file():
                if not os.access(item, os.R_OK):
                    raise InputError(f"--input_dataset file {item!r} is not readable")
                self.urls.append(item)
            else:
                raise InputError(f"--input_dataset tar {item!r} does not exist")
        self.image_keys = [k.strip().lower() for k in cfg.wds_image_key.split(";") if k.strip()]
        if cfg.cache_path:
            Path(cfg.cache_path).mkdir(parents=True, exist_ok=True)

    def units(self) -> list[str]:
        return list(self.urls)

    def unit_size(self, unit: int) -> int | None:
        return None

    def _captions(self, sample: dict[str, Any]) -> list[Any]:
        key = self.cfg.wds_caption_key
        if self.cfg.wds_caption_in_metadata:
            raw = sample.get("json")
            if raw is None:
                return []
            try:
                meta = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                return []
            value = meta.get(key) if isinstance(meta, dict) else None
        else:
            value = sample.get(key.lower())
        if value is None:
            return []
        return list(value) if isinstance(value, list) else [value]

    def records(self, unit: int) -> Iterator[Record]:
        import webdataset as wds

        url = self.urls[unit]
        errors: list[Exception] = []

        def stop_on_error(exn: Exception) -> bool:
            errors.append(exn)
            return False  # a broken tar stream cannot be resynchronised: keep what came before

        dataset = wds.WebDataset(
            [url], shardshuffle=False, handler=stop_on_error, nodesplitter=None, workersplitter=None,
            empty_check=False, cache_dir=self.cfg.cache_path,
        )
        for sample in dataset:
            key = str(sample.get("__key__", ""))
            image = next((sample[k] for k in self.image_keys if k in sample), None)
            captions = self._captions(sample)
            if image is None:
                yield Record(key, None, captions, reason="missing_image")
            else:
                yield Record(key, image, captions)
        if errors:
            yield Record(url, None, [], reason="truncated_tar")


class FilesReader(_ChunkedReader):
    """A folder tree of images, each with a same-stem .txt caption (clip-retrieval's layout)."""

    def __init__(self, cfg: ReaderConfig):
        self.chunk = cfg.samples_per_shard
        self.items = []
        for item in expand_inputs(cfg.inputs):
            root = Path(item).expanduser()
            if not root.exists():
                raise InputError(f"--input_dataset path {item!r} does not exist (expected a folder of images)")
            paths = [root] if root.is_file() else sorted(
                p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            base = root.parent if root.is_file() else root
            for path in paths:
                caption_path = path.with_suffix(".txt")
                captions = [caption_path.read_bytes()] if caption_path.exists() else []
                key = str(path.relative_to(base).with_suffix(""))
                self.items.append((key, str(path), captions))
        if not self.items:
            raise InputError(f"--input_dataset {cfg.inputs} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")


def _read_table_columns(path: Path, fmt: str, columns: list[str]) -> dict[str, list[Any]]:
    """Read only the named columns of a parquet/csv/jsonl table; a missing column fails at once."""
    columns = list(dict.fromkeys(columns))  # a column named twice (e.g. caption = key) is read once
    if fmt == "parquet":
        import pyarrow.parquet as pq

        available = pq.ParquetFile(path).schema_arrow.names
        _check_columns(path, columns, available)
        table = pq.read_table(path, columns=columns)
        return {c: table.column(c).to_pylist() for c in columns}
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            _check_columns(path, columns, reader.fieldnames or [])
            rows = list(reader)
        return {c: [r.get(c) for r in rows] for c in columns}
    out: dict[str, list[Any]] = {c: [] for c in columns}
    seen: set[str] = set()
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise InputError(f"{path}:{line_no} is not valid JSON ({err})") from err
            if not isinstance(row, dict):
                raise InputError(f"{path}:{line_no} is not a JSON object")
            seen.update(row)
            for c in columns:
                out[c].append(row.get(c))
    _check_columns(path, columns, sorted(seen))
    return out


def _check_columns(path: Path, columns: list[str], available: list[str]) -> None:
    missing = [c for c in columns if c not in available]
    if missing:
        raise InputError(
            f"table {path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(available) or 'none'}); "
            "name the right ones with --image_column / --caption_column / --key_column"
        )


class TableReader(_ChunkedReader):
    """parquet / csv / jsonl tables with an image column (path relative to the table, or bytes) and a caption column.

    Rows naming the same image path are grouped so that image is encoded once with all its captions.
    """

    def __init__(self, cfg: ReaderConfig):
        self.chunk = cfg.samples_per_shard
        fmt = cfg.input_format
        columns = [cfg.image_column, cfg.caption_column] + ([cfg.key_column] if cfg.key_column else [])
        groups: dict[Any, tuple[str, Any, list[Any]]] = {}
        for path in _local_files(cfg.inputs, TABLE_EXTENSIONS[fmt], fmt):
            data = _read_table_columns(path, fmt, columns)
            base = Path(cfg.image_root) if cfg.image_root else path.parent
            for row, (image, caption) in enumerate(zip(data[cfg.image_column], data[cfg.caption_column])):
                if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                    image = image.get("bytes") or image.get("path")
                if isinstance(image, str) and image.strip():
                    image_path = image.strip()
                    image = str(base / image_path) if not os.path.isabs(image_path) else image_path
                    group_id: Any = image
                    default_key = str(Path(image_path).with_suffix(""))
                else:
                    image = bytes(image) if isinstance(image, (bytes, bytearray)) and image else None
                    group_id = (str(path), row)  # inline bytes: one image per row
                    default_key = f"{path.stem}/{row}"
                key = str(data[cfg.key_column][row]) if cfg.key_column else default_key
                captions = caption if isinstance(caption, list) else [caption]
                if group_id in groups:
                    groups[group_id][2].extend(captions)
                else:
                    groups[group_id] = (key, image, list(captions))
        self.items = list(groups.values())
        if not self.items:
            raise InputError(f"--input_dataset {cfg.inputs}: the {fmt} tables have no rows")


class CocoReader(_ChunkedReader):
    """COCO captions json (images + annotations) or Karpathy's dataset_coco.json (with splits)."""

    def __init__(self, cfg: ReaderConfig):
        self.chunk = cfg.samples_per_shard
        files = _local_files(cfg.inputs, (".json",), "COCO json")
        splits = {s.strip() for s in cfg.coco_split.split(",")} if cfg.coco_split else None
        self.items = []
        for path in files:
            try:
                data = json.loads(path.read_bytes())
            except ValueError as err:
                raise InputError(f"COCO file {path} is not valid JSON ({err})") from err
            root = Path(cfg.image_root) if cfg.image_root else path.parent
            if not isinstance(data, dict) or "images" not in data:
                raise InputError(f"{path} is not a COCO captions json nor Karpathy's dataset_coco.json "
                                 "(no 'images' list)")
            images = data["images"]
            if images and "sentences" in images[0]:
                self._karpathy(images, root, splits)
            elif "annotations" in data:
                if splits:
                    raise InputError(f"--coco_split applies to Karpathy's dataset_coco.json; {path} is a COCO "
                                     "captions file (one file per split already)")
                self._coco(data, root)
            else:
                raise InputError(f"{path} has 'images' but neither 'annotations' (COCO) nor 'sentences' (Karpathy)")
        if not self.items:
            raise InputError(f"no COCO images selected from {cfg.inputs}"
                             + (f" for --coco_split {cfg.coco_split!r}" if splits else ""))

    def _karpathy(self, images: list[dict], root: Path, splits: set[str] | None) -> None:
        for img in images:
            if splits and img.get("split") not in splits:
                continue
            rel = Path(img.get("filepath", "")) / img["filename"]
            key = str(img.get("cocoid", img.get("imgid", img["filename"])))
            self.items.append((key, str(root / rel), [s.get("raw", " ".join(s.get("tokens", [])))
                                                      for s in img.get("sentences", [])]))

    def _coco(self, data: dict, root: Path) -> None:
        captions: dict[Any, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann.get("caption"))
        for img in sorted(data["images"], key=lambda i: i["id"]):
            self.items.append((str(img["id"]), str(root / img["file_name"]), captions.get(img["id"], [])))


class EmbeddingsReader:
    """clip-retrieval / LAION output: img_emb/*.npy with metadata/*.parquet rows in the same order."""

    def __init__(self, cfg: ReaderConfig):
        self.cfg = cfg
        self.pairs: list[tuple[Path, Path]] = []
        for item in expand_inputs(cfg.inputs):
            root = Path(item).expanduser()
            if not (root / "img_emb").is_dir() or not (root / "metadata").is_dir():
                raise InputError(f"--input_dataset {item!r} is not an embeddings folder "
                                 "(expected img_emb/*.npy and metadata/*.parquet inside)")
            embs = {self._index(p): p for p in (root / "img_emb").glob("*.npy")}
            metas = {self._index(p): p for p in (root / "metadata").glob("*.parquet")}
            if not embs:
                raise InputError(f"{root / 'img_emb'} holds no .npy files")
            for idx in sorted(embs):
                if idx not in metas:
                    raise InputError(f"{embs[idx]} has no matching metadata parquet in {root / 'metadata'}")
                self.pairs.append((embs[idx], metas[idx]))
        import pyarrow.parquet as pq

        self.dim = None
        for emb_path, meta_path in self.pairs:
            names = pq.ParquetFile(meta_path).schema_arrow.names
            _check_columns(meta_path, [cfg.caption_column] + ([cfg.key_column] if cfg.key_column else []), names)
            emb = np.load(emb_path, mmap_mode="r")
            rows = pq.ParquetFile(meta_path).metadata.num_rows
            if emb.ndim != 2 or emb.shape[0] != rows:
                raise InputError(f"{emb_path} has shape {emb.shape} but {meta_path} has {rows} rows "
                                 "(expected one embedding row per metadata row)")
            if self.dim is not None and emb.shape[1] != self.dim:
                raise InputError(f"{emb_path} has embedding size {emb.shape[1]}, other files {self.dim}")
            self.dim = int(emb.shape[1])

    @staticmethod
    def _index(path: Path) -> int:
        match = re.search(r"(\d+)$", path.stem)
        return int(match.group(1)) if match else 0

    def units(self) -> list[str]:
        return [str(e) for e, _ in self.pairs]

    def unit_size(self, unit: int) -> int | None:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.pairs[unit][1]).metadata.num_rows

    def records(self, unit: int) -> Iterator[Record]:
        import pyarrow.parquet as pq

        emb_path, meta_path = self.pairs[unit]
        emb = np.load(emb_path, mmap_mode="r")  # (N, C) read lazily, row by row
        cfg = self.cfg
        names = pq.ParquetFile(meta_path).schema_arrow.names
        key_col = cfg.key_column or next((c for c in ("key", "image_path", "url") if c in names), None)
        table = pq.read_table(meta_path, columns=list(dict.fromkeys([cfg.caption_column] + ([key_col] if key_col else []))))
        captions = table.column(cfg.caption_column).to_pylist()
        keys = table.column(key_col).to_pylist() if key_col else [f"{meta_path.stem}/{i}" for i in range(len(captions))]
        for row, (key, caption) in enumerate(zip(keys, captions)):
            yield Record(str(key), None, caption if isinstance(caption, list) else [caption],
                         embedding=np.asarray(emb[row], dtype=np.float32))


# Registry: --input_format -> reader class.
READERS: dict[str, Callable[[ReaderConfig], Reader]] = {
    "webdataset": WebDatasetReader,
    "files": FilesReader,
    "parquet": TableReader,
    "csv": TableReader,
    "jsonl": TableReader,
    "coco": CocoReader,
    "embeddings": EmbeddingsReader,
}


def make_reader(cfg: ReaderConfig) -> Reader:
    """Build the reader for cfg.input_format; validates paths and columns at once."""
    if cfg.input_format not in READERS:
        raise InputError(f"unknown --input_format {cfg.input_format!r}; expected one of {', '.join(READERS)}")
    if cfg.samples_per_shard < 1:
        raise InputError(f"--samples_per_shard must be >= 1, got {cfg.samples_per_shard}")
    return READERS[cfg.input_format](cfg)
