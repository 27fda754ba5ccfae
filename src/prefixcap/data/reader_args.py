"""The reader flags on a command line: ReaderOptions fields as --flags, and parsed flags back to ReaderOptions."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from prefixcap.data.records import ReaderOptions

# Flag of each ReaderOptions field: (help group, help). Defaults come from ReaderOptions.
WDS_GROUP = "webdataset input"
TABLE_GROUP = "parquet / csv / jsonl / coco / embeddings input"
HF_GROUP = "Hugging Face datasets input (--input_format hf_dataset; also uses --image_column, --caption_column, " \
           "--key_column, --image_root)"
READER_FLAGS: dict[str, tuple[str, str]] = {
    "wds_image_key": (WDS_GROUP, "image extension(s) in the tars, e.g. jpg;png"),
    "wds_caption_key": (WDS_GROUP, "caption extension (or json field)"),
    "wds_caption_in_metadata": (WDS_GROUP, "read the caption from the sample's .json under --wds_caption_key"),
    "cache_path": (WDS_GROUP, "webdataset cache folder for remote tars"),
    "image_column": (TABLE_GROUP, "column with the image path (relative to the table) or bytes"),
    "caption_column": (TABLE_GROUP, "column with the caption (or a list of captions)"),
    "key_column": (TABLE_GROUP, "column with a sample key (default: the image path)"),
    "image_root": (TABLE_GROUP, "folder image paths are relative to (default: the table's / json's folder)"),
    "coco_split": (TABLE_GROUP, "Karpathy split(s) to keep, e.g. train,restval"),
    "hf_split": (HF_GROUP, "split to read (default: train, or the dataset's only split)"),
    "hf_config": (HF_GROUP, "dataset configuration name (load_dataset's name=)"),
    "hf_streaming": (HF_GROUP, "stream the dataset (IterableDataset; work units = its shards) instead of "
                               "downloading it whole / memory-mapping it"),
}
SWITCHES = {"hf_streaming"}  # on/off flags whose default is None (see ReaderOptions)


def add_reader_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, title: str | None = None,
                    only: Iterable[str] | None = None, defaults: dict[str, Any] | None = None) -> None:
    """Add the reader flags (--wds_image_key, --image_column, ...) to a CLI.

    title: one argument group with this title (default: preprocess's two groups; a group given as
    `parser` takes them all);
    only: the subset of flags this CLI offers; defaults: CLI-specific defaults (field -> value).
    """
    from prefixcap.argtypes import boolean

    names = list(only) if only is not None else list(READER_FLAGS)
    unknown = [n for n in names + list(defaults or {}) if n not in READER_FLAGS]
    if unknown:
        raise ValueError(f"unknown reader option(s) {unknown}; expected some of {', '.join(READER_FLAGS)}")
    base = ReaderOptions()
    groups: dict[str, Any] = {}
    for name in names:
        group_title, help_text = READER_FLAGS[name]
        group_title = title or group_title
        if group_title not in groups:
            # An argument group given as `parser` takes the flags itself.
            is_group = isinstance(parser, argparse._ArgumentGroup)
            groups[group_title] = parser if is_group else parser.add_argument_group(group_title)
        default = (defaults or {}).get(name, getattr(base, name))
        if isinstance(getattr(base, name), bool) or name in SWITCHES:
            groups[group_title].add_argument(f"--{name}", type=boolean, nargs="?", const=True, default=default,
                                             help=help_text)
        else:
            groups[group_title].add_argument(f"--{name}", default=default, help=help_text)


def reader_options_from_args(args: argparse.Namespace, **overrides: Any) -> ReaderOptions:
    """The ReaderOptions a parsed command line asks for; fields without a flag keep their defaults."""
    values = {f.name: getattr(args, f.name) for f in fields(ReaderOptions) if hasattr(args, f.name)}
    values.update(overrides)
    return ReaderOptions(**values)
