"""What `prefixcap caption` reads: image files, folders, globs, any dataset the readers read, preprocessed
folders and clip-retrieval embeddings, turned into pipeline items in input order, unit by unit."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prefixcap.data.images import IMAGE_EXTENSIONS
from prefixcap.data.readers import InputError, ReaderConfig, ReaderOptions, make_reader
from prefixcap.errors import UsageError
from prefixcap.caption.pipeline import Item

GLOB_CHARS = set("*?[")
# Extensions that name a dataset format in --input_format auto.
AUTO_FORMATS = {".tar": "webdataset", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl"}
FORMATS = ("auto", "images", "preprocessed", "webdataset", "files", "parquet", "csv", "jsonl", "coco",
           "embeddings", "hf_dataset")


class CaptionInputError(UsageError):
    """An input argument that cannot be read as asked (named in the message)."""


@dataclass
class CaptionInputs:
    """The inputs of one caption run and how to read them."""

    inputs: list[str]
    input_format: str = "auto"  # one of FORMATS; auto decides per input (see classify)
    # Captions are not needed to caption, so by default no caption column is read at all.
    reader: ReaderOptions = field(default_factory=lambda: ReaderOptions(caption_column=None))
    limit: int | None = None  # stop after this many items


@dataclass
class Source:
    """Consecutive inputs read the same way."""

    input_format: str
    inputs: list[str] = field(default_factory=list)


@dataclass
class InputUnit:
    """One input shard (a tar, a table chunk, a preprocessed folder, ...): its items, read when asked."""

    name: str
    input_format: str
    size: int | None  # items in it, when known without reading it
    items: Callable[[], Iterator[Item]]


def classify(path: str) -> str:
    """--input_format auto: what one input argument is."""
    p = Path(path)
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return "preprocessed"
        if (p / "img_emb").is_dir() and (p / "metadata").is_dir():
            return "embeddings"
        if any(child.suffix.lower() == ".tar" for child in p.iterdir()):
            return "webdataset"  # an img2dataset output folder: its tars (and .parquet/_stats.json beside them)
        return "images"
    suffix = p.suffix.lower()
    if suffix in AUTO_FORMATS and not GLOB_CHARS & set(path):
        return AUTO_FORMATS[suffix]
    return "images"


def group_sources(inputs: list[str], input_format: str) -> list[Source]:
    """Consecutive inputs of the same format form one source (input order is kept)."""
    if input_format != "auto":
        return [Source(input_format, list(inputs))]
    sources: list[Source] = []
    for item in inputs:
        fmt = classify(item)
        if sources and sources[-1].input_format == fmt:
            sources[-1].inputs.append(item)
        else:
            sources.append(Source(fmt, [item]))
    return sources


def image_paths(inputs: list[str]) -> list[str]:
    """Image files named directly, found in folders (recursively) or matched by globs; sorted per input."""
    out: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise CaptionInputError(f"folder {item!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif GLOB_CHARS & set(item):
            found = sorted(p for p in glob.glob(os.path.expanduser(item), recursive=True)
                           if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file())
            if not found:
                raise CaptionInputError(f"pattern {item!r} matches no image files")
            out += found
        else:
            out.append(item)  # a missing or broken file becomes an error line, not a failed run
    return out


def _image_units(source: Source) -> Iterator[InputUnit]:
    paths = image_paths(source.inputs)
    yield InputUnit("images", "images", len(paths), lambda: (Item(p, image=p) for p in paths))


def open_preprocessed(path: str):
    """A preprocessed folder of image embeddings, or a CaptionInputError naming it."""
    from prefixcap.data.shards import load_preprocessed
    from prefixcap.data.text_only import text_only_refusal

    try:
        dataset = load_preprocessed(path)
    except (FileNotFoundError, OSError) as err:
        raise CaptionInputError(f"cannot open preprocessed dataset {path!r}: {err}") from err
    refusal = text_only_refusal(path, dataset.manifest)
    if refusal:
        raise CaptionInputError(f"preprocessed dataset {refusal}")
    return dataset


def _preprocessed_units(source: Source) -> Iterator[InputUnit]:
    for path in source.inputs:
        dataset = open_preprocessed(path)

        def items(dataset=dataset) -> Iterator[Item]:
            for i in range(dataset.num_images):
                key, embedding = dataset.image(i)
                tokens = dataset.image_patch_tokens(i) if dataset.patch_token_shape else None  # (N, C)
                yield Item(key, embedding=embedding, patch_tokens=tokens)

        yield InputUnit(path, "preprocessed", dataset.num_images, items)


def _reader_units(source: Source, options: ReaderOptions) -> Iterator[InputUnit]:
    from prefixcap.data.decode import SKIP_REASONS

    try:
        reader = make_reader(ReaderConfig(source.inputs, source.input_format, options))
    except InputError as err:
        raise CaptionInputError(str(err)) from err

    def items(unit: int) -> Iterator[Item]:
        for record in reader.records(unit):
            if record.reason:
                yield Item(record.key, error=f"{record.reason}: {SKIP_REASONS.get(record.reason, record.reason)}")
            elif record.embedding is not None:
                yield Item(record.key, embedding=record.embedding)
            else:
                yield Item(record.key, image=record.image)

    for unit, name in enumerate(reader.units()):
        yield InputUnit(name, source.input_format, reader.unit_size(unit), lambda unit=unit: items(unit))


def input_units(cfg: CaptionInputs) -> Iterator[InputUnit]:
    """Every input unit in input order; a bad input argument raises CaptionInputError when its source is reached."""
    if cfg.input_format not in FORMATS:
        raise CaptionInputError(f"unknown --input_format {cfg.input_format!r}; expected one of {', '.join(FORMATS)}")
    for source in group_sources(cfg.inputs, cfg.input_format):
        if source.input_format == "images":
            yield from _image_units(source)
        elif source.input_format == "preprocessed":
            yield from _preprocessed_units(source)
        else:
            yield from _reader_units(source, cfg.reader)


def iter_items(cfg: CaptionInputs) -> Iterator[Item]:
    """Every item of every unit, in input order, stopping after cfg.limit items."""
    n = 0
    for unit in input_units(cfg):
        for item in unit.items():
            if cfg.limit is not None and n >= cfg.limit:
                return
            n += 1
            yield item


def count_items(cfg: CaptionInputs) -> int | None:
    """Total for the progress bar when it is known without reading datasets (images, preprocessed folders).

    Every image and preprocessed input is opened, whatever comes before it, so that a folder without images
    or a text-only dataset is refused before anything is captioned (not after the inputs ahead of it)."""
    total: int | None = 0
    for source in group_sources(cfg.inputs, cfg.input_format):
        if source.input_format == "images":
            count: int | None = len(image_paths(source.inputs))
        elif source.input_format == "preprocessed":
            count = sum(open_preprocessed(p).num_images for p in source.inputs)
        else:
            count = None  # a dataset's size is known only once it is read
        total = None if total is None or count is None else total + count
    if total is None or cfg.limit is None:
        return total
    return min(total, cfg.limit)


def needs_encoder(cfg: CaptionInputs) -> bool:
    """Whether any input holds images (so the CLIP encoder must load), not only embeddings."""
    sources = group_sources(cfg.inputs, cfg.input_format)
    return any(s.input_format not in ("preprocessed", "embeddings") for s in sources)
