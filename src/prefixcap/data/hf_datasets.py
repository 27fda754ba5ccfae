"""Hugging Face `datasets` input (--input_format hf_dataset): a save_to_disk folder, a local dataset folder or a
Hub dataset id, read in place (memory-mapped Arrow) or streamed shard by shard."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefixcap.data.records import InputError, ReaderConfig, ReaderOptions, Record
from prefixcap.errors import first_line

# Tried in order when --image_column / --caption_column are left at their (table-oriented) defaults.
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "file_name", "filepath")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentences_raw")
_CAPTION_FIELDS = ("raw", "caption", "text")  # captions given as dicts, e.g. Karpathy-style {"raw": ...}
_ROWS_PER_READ = 64  # rows sliced from an Arrow table at once: bounded memory with inline image bytes


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _choose_split(loaded: Any, split: str | None, item: str) -> tuple[Any, str]:
    """A DatasetDict's split: --hf_split, else 'train', else its only split."""
    names = list(loaded.keys())
    if split is None:
        split = "train" if "train" in names else names[0] if len(names) == 1 else None
        if split is None:
            raise InputError(f"--input_dataset {item!r} has the splits {', '.join(names)}; "
                             "choose one with --hf_split")
    if split not in names:
        raise InputError(f"--input_dataset {item!r} has no split {split!r} (--hf_split); its splits: {', '.join(names)}")
    return loaded[split], split


def _image_value(value: Any, base: Path | None) -> bytes | str | None:
    """An image cell -> encoded bytes or a file path (what the decode workers read)."""
    if isinstance(value, dict):  # the Image feature undecoded: {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        if base is not None and not os.path.isabs(value) and "://" not in value:
            return str(base / value)
        return value
    if hasattr(value, "save") and hasattr(value, "mode"):  # a decoded PIL image (a feature we could not cast)
        buf = io.BytesIO()
        value.save(buf, format="PNG")  # lossless: the encoder sees the dataset's pixels
        return buf.getvalue()
    return None


def _captions(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, dict):
        value = next((value[k] for k in _CAPTION_FIELDS if k in value), None)
        return _captions(value)
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in _captions(v)]
    return [value]


class HFDatasetReader:
    """One or more Hugging Face datasets; units are row ranges (in place) or the dataset's shards (--hf_streaming)."""

    def __init__(self, cfg: ReaderConfig):
        try:
            import datasets  # noqa: F401
        except ImportError as err:  # pragma: no cover - datasets is a dependency
            raise InputError("--input_format hf_dataset needs the datasets package (pip install datasets)") from err
        self.cfg, self.options, self.chunk = cfg, cfg.options, cfg.samples_per_shard
        self.hub_datasets: list[str] = []  # Hub ids read (the model card's `datasets:`)
        self.sources: list[dict[str, Any]] = []
        self._units: list[tuple[int, int, int]] = []  # (source, start row | shard, end row | -1)
        self._names: list[str] = []
        for item in cfg.inputs:
            self._add_source(item)
        if not self._units:
            raise InputError(f"--input_dataset {cfg.inputs}: the datasets have no rows")

    # --- opening ------------------------------------------------------------------------------
    def _load(self, item: str) -> tuple[Any, str, Path | None]:
        import datasets

        opts: ReaderOptions = self.options
        streaming = bool(opts.hf_streaming)
        path = Path(item).expanduser()
        try:
            if path.is_dir() and _is_saved_to_disk(path):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    ds, split = _choose_split(loaded, opts.hf_split, item)
                else:
                    ds, split = loaded, opts.hf_split or str(loaded.split or "train")
                if streaming:
                    ds = ds.to_iterable_dataset(num_shards=max(1, len(ds.cache_files)))
                return ds, split, path
            if path.exists() and not path.is_dir():
                raise InputError(f"--input_dataset {item!r} is a file; --input_format hf_dataset reads a dataset "
                                 "folder (save_to_disk, or a folder of data files) or a Hub dataset id")
            if not path.exists() and (item.startswith((".", "/", "~")) or item.count("/") > 1):
                raise InputError(f"--input_dataset {item!r} does not exist (expected a dataset folder or a Hub "
                                 "dataset id such as org/name)")
            split = opts.hf_split or "train"
            ds = datasets.load_dataset(str(path) if path.is_dir() else item, name=opts.hf_config, split=split,
                                       streaming=streaming)
            if not path.is_dir():
                self.hub_datasets.append(item)
            return ds, split, path if path.is_dir() else None
        except InputError:
            raise
        except (ValueError, OSError, ConnectionError, ImportError) as err:
            raise InputError(f"--input_dataset {item!r}: cannot load it as a Hugging Face dataset "
                             f"({first_line(err)})") from err

    def _column(self, flag: str, given: str | None, default: str | None, candidates: tuple[str, ...],
                columns: list[str] | None, item: str) -> str | None:
        if given is None or columns is None:
            return given
        if given in columns:
            return given
        if given == default:  # left at the table default: take the dataset's usual name
            found = next((c for c in candidates if c in columns), None)
            if found:
                return found
        raise InputError(f"dataset {item!r} has no column {given!r} ({flag}); its columns: {', '.join(columns)}")

    def _add_source(self, item: str) -> None:
        from datasets import Image

        ds, split, base = self._load(item)
        opts, defaults = self.options, ReaderOptions()
        columns = list(ds.column_names) if ds.column_names is not None else None
        image_col = self._column("--image_column", opts.image_column, defaults.image_column, IMAGE_COLUMNS,
                                 columns, item)
        caption_col = self._column("--caption_column", opts.caption_column, defaults.caption_column,
                                   CAPTION_COLUMNS, columns, item)
        key_col = self._column("--key_column", opts.key_column, None, (), columns, item)
        features = getattr(ds, "features", None) or {}
        if isinstance(features.get(image_col), Image):
            # Undecoded: the encoded bytes go to the decode workers as for every other input format.
            ds = ds.cast_column(image_col, Image(decode=False))
        wanted = [c for c in dict.fromkeys((image_col, caption_col, key_col)) if c]
        if columns is not None:
            ds = ds.select_columns(wanted)
        index = len(self.sources)
        root = Path(self.options.image_root) if self.options.image_root else base
        label = item if len(self.cfg.inputs) == 1 else f"{index}:{item}"
        self.sources.append({"ds": ds, "split": split, "image": image_col, "caption": caption_col, "key": key_col,
                             "base": root, "prefix": "" if len(self.cfg.inputs) == 1 else f"{index}:"})
        if bool(self.options.hf_streaming):
            n = int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1) or 1)
            self.sources[-1]["num_shards"] = n
            for shard in range(n):
                self._units.append((index, shard, -1))
                self._names.append(f"{label}[{split}]#shard{shard}/{n}")
        else:
            rows = len(ds)
            for lo in range(0, rows, self.chunk):
                hi = min(lo + self.chunk, rows)
                self._units.append((index, lo, hi))
                self._names.append(f"{label}[{split}][{lo}:{hi}]")

    # --- the Reader interface -------------------------------------------------------------------
    def units(self) -> list[str]:
        return list(self._names)

    def unit_size(self, unit: int) -> int | None:
        source, lo, hi = self._units[unit]
        if hi < 0 or self.sources[source]["key"]:
            return None  # streamed, or rows grouped by --key_column
        return hi - lo

    def _rows(self, unit: int) -> Iterator[tuple[str, dict[str, Any]]]:
        source, lo, hi = self._units[unit]
        src = self.sources[source]
        if hi < 0:
            n = src["num_shards"]
            shard = src["ds"].shard(num_shards=n, index=lo) if n > 1 else src["ds"]
            for j, row in enumerate(shard):
                yield f"{src['prefix']}{src['split']}/shard{lo}/{j}", row
            return
        for start in range(lo, hi, _ROWS_PER_READ):
            batch = src["ds"][start:min(start + _ROWS_PER_READ, hi)]  # column -> values
            cols = list(batch)
            for j in range(len(batch[cols[0]]) if cols else 0):
                yield f"{src['prefix']}{src['split']}/{start + j}", {c: batch[c][j] for c in cols}

    def records(self, unit: int) -> Iterator[Record]:
        src = self.sources[self._units[unit][0]]
        pending: Record | None = None
        for default_key, row in self._rows(unit):
            if src["image"] and src["image"] not in row:  # None: a text-only read (data.text_only)
                raise InputError(f"dataset row {default_key} has no column {src['image']!r} (--image_column); "
                                 f"its columns: {', '.join(row)}")
            key = str(row[src["key"]]) if src["key"] else default_key
            captions = _captions(row.get(src["caption"])) if src["caption"] else []
            if pending is not None and src["key"] and key == pending.key:
                pending.captions.extend(captions)  # consecutive rows of one image: one record, all captions
                continue
            if pending is not None:
                yield pending
            image = _image_value(row[src["image"]], src["base"]) if src["image"] else None
            pending = Record(key, image, captions) if image is not None else \
                Record(key, None, captions, reason="missing_image")
        if pending is not None:
            yield pending
