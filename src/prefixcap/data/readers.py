"""Input readers: each turns one input format into work units of per-image records (image + all its captions)."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np

from prefixcap.data.images import IMAGE_EXTENSIONS
# The shared types live in data.records (ReaderOptions is imported only so that importing it from
# here keeps working); the command-line flags in data.reader_args.
from prefixcap.data.records import InputError, Reader, ReaderConfig, ReaderOptions, Record  # noqa: F401

TABLE_EXTENSIONS = {"parquet": (".parquet",), "csv": (".csv", ".tsv"), "jsonl": (".jsonl", ".json")}


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
        self.options = opts = cfg.options
        self.image_keys = [k.strip().lower() for k in opts.wds_image_key.split(";") if k.strip()]
        if opts.cache_path:
            Path(opts.cache_path).mkdir(parents=True, exist_ok=True)
        # What the first samples hold (member extensions, json keys), for a run that finds nothing usable.
        self._seen_samples, self._seen_members, self._seen_json_keys = 0, set(), set()

    def units(self) -> list[str]:
        return list(self.urls)

    def unit_size(self, unit: int) -> int | None:
        return None

    def _captions(self, sample: dict[str, Any]) -> list[Any]:
        key = self.options.wds_caption_key
        if self.options.wds_caption_in_metadata:
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

    def input_layout(self) -> str | None:
        """What was looked for and what the first samples hold (member extensions, json keys)."""
        if not self._seen_samples:
            return None
        opts = self.options
        if opts.wds_caption_in_metadata:
            looked = (f"looked for the caption under the key {opts.wds_caption_key!r} of each sample's .json "
                      "(--wds_caption_in_metadata, --wds_caption_key)")
        else:
            looked = f"looked for the caption in each sample's .{opts.wds_caption_key} member (--wds_caption_key)"
        looked += f" and the image in .{' or .'.join(self.image_keys)} (--wds_image_key)"
        held = (f"the first {self._seen_samples} samples hold the members "
                + ", ".join(f".{m}" for m in sorted(self._seen_members)))
        if self._seen_json_keys:
            held += f", with json keys {', '.join(sorted(self._seen_json_keys))}"
        return f"{looked}; {held}"

    def _observe(self, sample: dict[str, Any]) -> None:
        if self._seen_samples >= 20:
            return
        self._seen_samples += 1
        self._seen_members.update(k for k in sample if not k.startswith("__"))
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError, TypeError):
                return
            if isinstance(meta, dict):
                self._seen_json_keys.update(str(k) for k in list(meta)[:50])

    def records(self, unit: int) -> Iterator[Record]:
        import webdataset as wds

        url = self.urls[unit]
        errors: list[Exception] = []
        duplicates: list[str] = []

        def stop_on_error(exn: Exception) -> bool:
            message = str(exn.args[0]) if exn.args else ""
            if "duplicate file name in tar file" in message:
                # A member name repeated within a sample: the first is kept, the repeat is counted
                # (duplicate_member) and the rest of the tar is read on.
                duplicates.append(message.split(": duplicate file name", 1)[0])
                return True
            errors.append(exn)
            return False  # a broken tar stream cannot be resynchronised: keep what came before

        dataset = wds.WebDataset(
            [url], shardshuffle=False, handler=stop_on_error, nodesplitter=None, workersplitter=None,
            empty_check=False, cache_dir=self.options.cache_path,
        )
        for sample in dataset:
            while duplicates:
                yield Record(f"{url}:{duplicates.pop(0)}", None, [], reason="duplicate_member")
            self._observe(sample)
            key = str(sample.get("__key__", ""))
            image = next((sample[k] for k in self.image_keys if k in sample), None)
            captions = self._captions(sample)
            if image is None:
                yield Record(key, None, captions, reason="missing_image")
            else:
                yield Record(key, image, captions)
        for member in duplicates:
            yield Record(f"{url}:{member}", None, [], reason="duplicate_member")
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
        fmt, opts = cfg.input_format, cfg.options
        columns = [opts.image_column] + [c for c in (opts.caption_column, opts.key_column) if c]
        groups: dict[Any, tuple[str, Any, list[Any]]] = {}
        for path in _local_files(cfg.inputs, TABLE_EXTENSIONS[fmt], fmt):
            data = _read_table_columns(path, fmt, columns)
            base = Path(opts.image_root) if opts.image_root else path.parent
            no_captions = [None] * len(data[opts.image_column])
            captions_column = data[opts.caption_column] if opts.caption_column else no_captions
            for row, (image, caption) in enumerate(zip(data[opts.image_column], captions_column)):
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
                key = str(data[opts.key_column][row]) if opts.key_column else default_key
                captions = caption if isinstance(caption, list) else [] if caption is None else [caption]
                if group_id in groups:
                    groups[group_id][2].extend(captions)
                else:
                    groups[group_id] = (key, image, list(captions))
        self.items = list(groups.values())
        if not self.items:
            raise InputError(f"--input_dataset {cfg.inputs}: the {fmt} tables have no rows")


class CocoReader(_ChunkedReader):
    """COCO captions json (images + annotations) or Karpathy's dataset_*.json (with splits); see data/coco.py."""

    def __init__(self, cfg: ReaderConfig):
        from prefixcap.data.coco import CocoFormatError, load_coco, parse_splits

        self.chunk = cfg.samples_per_shard
        opts = cfg.options
        splits = parse_splits(opts.coco_split)
        self.items = []
        for path in _local_files(cfg.inputs, (".json",), "COCO json"):
            try:
                parsed = load_coco(path, splits)
            except CocoFormatError as err:
                raise InputError(f"{err} (choose with --coco_split)" if err.bad_split else str(err)) from err
            root = Path(opts.image_root) if opts.image_root else path.parent
            images = parsed.images
            if parsed.kind == "coco":
                # By id: the order preprocess has always written (resume relies on a fixed order).
                images = sorted(images, key=lambda img: (_numeric(img.key), img.key))
            self.items += [(img.key, str(root / img.file) if img.file else None, img.captions) for img in images]
        if not self.items:
            raise InputError(f"no COCO images selected from {cfg.inputs}"
                             + (f" for --coco_split {opts.coco_split!r}" if splits else ""))


def _numeric(key: str) -> int | float:
    try:
        return int(key)
    except ValueError:
        return float("inf")


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
            _check_columns(meta_path, [c for c in (cfg.options.caption_column, cfg.options.key_column) if c], names)
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
        opts = self.cfg.options
        names = pq.ParquetFile(meta_path).schema_arrow.names
        key_col = opts.key_column or next((c for c in ("key", "image_path", "url") if c in names), None)
        wanted = [c for c in (opts.caption_column, key_col) if c]
        table = pq.read_table(meta_path, columns=list(dict.fromkeys(wanted)))
        captions = table.column(opts.caption_column).to_pylist() if opts.caption_column else [None] * len(emb)
        keys = table.column(key_col).to_pylist() if key_col else [f"{meta_path.stem}/{i}" for i in range(len(captions))]
        for row, (key, caption) in enumerate(zip(keys, captions)):
            captions_of_row = caption if isinstance(caption, list) else [] if caption is None else [caption]
            yield Record(str(key), None, captions_of_row, embedding=np.asarray(emb[row], dtype=np.float32))


def _hf_dataset_reader(cfg: ReaderConfig) -> Reader:
    # Imported on use: `datasets` is slow to import.
    from prefixcap.data.hf_datasets import HFDatasetReader

    return HFDatasetReader(cfg)


# Registry: --input_format -> reader class.
READERS: dict[str, Callable[[ReaderConfig], Reader]] = {
    "webdataset": WebDatasetReader,
    "files": FilesReader,
    "parquet": TableReader,
    "csv": TableReader,
    "jsonl": TableReader,
    "coco": CocoReader,
    "embeddings": EmbeddingsReader,
    "hf_dataset": _hf_dataset_reader,
}


def make_reader(cfg: ReaderConfig) -> Reader:
    """Build the reader for cfg.input_format; validates paths and columns at once."""
    if cfg.input_format not in READERS:
        raise InputError(f"unknown --input_format {cfg.input_format!r}; expected one of {', '.join(READERS)}")
    if cfg.samples_per_shard < 1:
        raise InputError(f"--samples_per_shard must be >= 1, got {cfg.samples_per_shard}")
    return READERS[cfg.input_format](cfg)
