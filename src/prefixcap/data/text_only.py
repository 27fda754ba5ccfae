"""Caption-only inputs for `preprocess --text_only`: one record per caption, from any reader input or a text file.

A text-only dataset stores one CLIP *text* embedding per caption where an image dataset stores one
image embedding per image, so every caption becomes its own record, keyed `{sample key}#{i}` (the
i-th caption of that sample). Images are never read: a webdataset, COCO or Hugging Face input
without any image works, tables need only the caption column, and `--input_format text` reads
plain text files of one caption per line (blank lines are not captions and are passed over).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from prefixcap.data.decode import NOT_SAMPLE_REASONS
from prefixcap.data.readers import TABLE_EXTENSIONS, _ChunkedReader, _local_files, _read_table_columns, make_reader
from prefixcap.data.records import InputError, Reader, ReaderConfig, Record

TEXT_FORMAT = "text"  # --input_format text: .txt files, one caption per line (text-only datasets only)
TEXT_EXTENSIONS = (".txt",)


class PerCaptionReader:
    """Wraps a reader: each record's captions become one image-less record each (`key#i`)."""

    def __init__(self, inner: Reader):
        self.inner = inner
        self.hub_datasets = list(getattr(inner, "hub_datasets", None) or [])

    def units(self) -> list[str]:
        return self.inner.units()

    def unit_size(self, unit: int) -> int | None:
        return None  # captions per sample are not known before reading

    def input_layout(self) -> str | None:
        layout = getattr(self.inner, "input_layout", None)
        return layout() if callable(layout) else None

    def records(self, unit: int) -> Iterator[Record]:
        for record in self.inner.records(unit):
            if record.reason in NOT_SAMPLE_REASONS or (record.reason and record.reason != "missing_image"):
                yield record  # a tar member / truncated tar / known-bad sample: counted as before
            elif not record.captions:
                yield Record(record.key, None, [], reason="no_caption")
            else:
                for i, caption in enumerate(record.captions):
                    yield Record(f"{record.key}#{i}", None, [caption])


class TextTableReader(_ChunkedReader):
    """parquet / csv / jsonl tables read for their caption column (and --key_column) only: no image column needed."""

    def __init__(self, cfg: ReaderConfig):
        self.chunk = cfg.samples_per_shard
        opts, fmt = cfg.options, cfg.input_format
        self.items = []
        for path in _local_files(cfg.inputs, TABLE_EXTENSIONS[fmt], fmt):
            columns = [c for c in (opts.caption_column, opts.key_column) if c]
            data = _read_table_columns(path, fmt, columns)
            for row, caption in enumerate(data[opts.caption_column]):
                key = str(data[opts.key_column][row]) if opts.key_column else f"{path.stem}/{row}"
                captions = caption if isinstance(caption, list) else [] if caption is None else [caption]
                self.items.append((key, None, captions))
        if not self.items:
            raise InputError(f"--input_dataset {cfg.inputs}: the {fmt} tables have no rows")


class TextLinesReader(_ChunkedReader):
    """--input_format text: plain .txt files (or folders of them), one caption per line; keys `{file stem}/{line}`."""

    def __init__(self, cfg: ReaderConfig):
        self.chunk = cfg.samples_per_shard
        self.items: list[tuple[str, Any, list[Any]]] = []
        for path in _local_files(cfg.inputs, TEXT_EXTENSIONS, "text (.txt, one caption per line)"):
            with open(path, "rb") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        self.items.append((f"{path.stem}/{line_no}", None, [line.rstrip(b"\r\n")]))
        if not self.items:
            raise InputError(f"--input_dataset {cfg.inputs}: the text files hold no caption (no non-blank line)")


def make_caption_reader(cfg: ReaderConfig) -> Reader:
    """The captions of any input format with no image read: one record per sample (its key, its captions).

    Shared by `preprocess --text_only` (through PerCaptionReader) and `prefixcap datastore build`."""
    fmt = cfg.input_format
    if fmt == "embeddings":
        raise InputError("captions are embedded with the CLIP text tower, but --input_format embeddings holds "
                         "precomputed image embeddings; give the captions as jsonl/csv/parquet/text instead")
    if not cfg.options.caption_column:
        raise InputError("captions are needed: give --caption_column")
    if fmt == TEXT_FORMAT:
        return TextLinesReader(cfg)
    if fmt in TABLE_EXTENSIONS:
        return TextTableReader(cfg)
    if fmt == "hf_dataset":  # no image column is looked for
        return make_reader(replace(cfg, options=replace(cfg.options, image_column=None)))
    return make_reader(cfg)


def make_text_reader(cfg: ReaderConfig) -> PerCaptionReader:
    """The reader of a text-only preprocess run: captions of any input format, one record per caption."""
    return PerCaptionReader(make_caption_reader(cfg))


def text_only_refusal(path: Any, manifest: Any) -> str | None:
    """Why the preprocessed folder at `path` cannot stand in for images (caption's input, evaluate's references):
    a text-only one holds one row per caption whose embedding is its own reference, so captions or scores of it
    would mean nothing. None for an image dataset."""
    if not manifest.text_only:
        return None
    return (f"{str(path)!r} holds CLIP text embeddings of captions (preprocess --text_only), one row per caption, "
            "not image embeddings: use images or a dataset preprocessed from them")
