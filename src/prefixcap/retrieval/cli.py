"""`prefixcap datastore build|info`: flags -> DatastoreConfig -> build_datastore -> a printed summary."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from prefixcap.argtypes import ArgumentParser, DefaultsHelpFormatter, positive_int
from prefixcap.data.reader_args import add_reader_args, reader_options_from_args
from prefixcap.data.text_only import TEXT_FORMAT
from prefixcap.retrieval.build import DatastoreConfig, build_datastore
from prefixcap.retrieval.datastore import INDEX_TYPES

PROG = "prefixcap datastore"
FORMATS = ("webdataset", "files", "parquet", "csv", "jsonl", "coco", "hf_dataset", TEXT_FORMAT)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Caption datastores for retrieval-augmented captioning "
                       "(train --datastore, caption --datastore); see docs/retrieval.md.")
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", formatter_class=DefaultsHelpFormatter,
                       help="embed captions with the CLIP text encoder into a FAISS index",
                       description="Embed the captions of any input with the CLIP text encoder and write a FAISS "
                                   "index plus the captions (resumable; the manifest is written last).")
    b.add_argument("--input_dataset", nargs="+", required=True, help="inputs, as preprocess reads them; with "
                   f"--input_format {TEXT_FORMAT}: .txt files (or folders of them), one caption a line")
    b.add_argument("--input_format", default="files", choices=FORMATS)
    b.add_argument("--output_dir", required=True, help="the datastore folder")
    b.add_argument("--clip_model", default="ViT-B/32", help="CLIP model whose text encoder embeds the captions "
                   "(the same the captioner's images are embedded with)")
    b.add_argument("--index_type", default="flat", choices=INDEX_TYPES,
                   help="flat: exact inner product; ivf / hnsw: approximate, for millions of captions")
    b.add_argument("--batch_size", type=positive_int, default=256)
    b.add_argument("--device", default="cpu")
    b.add_argument("--append", action="store_true", help="add these captions to the datastore in --output_dir")
    b.add_argument("--no_progress", action="store_true")
    add_reader_args(b, only=["wds_image_key", "wds_caption_key", "wds_caption_in_metadata", "cache_path",
                             "image_column", "caption_column", "key_column", "image_root", "coco_split",
                             "hf_split", "hf_config", "hf_streaming"])
    i = sub.add_parser("info", help="print a datastore's manifest")
    i.add_argument("datastore")
    return p


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    args = build_parser().parse_args(argv)
    hf_logging.disable_progress_bar()  # weight-loading bars would drown the build's own bar
    if args.action == "info":
        from prefixcap.retrieval.datastore import Datastore

        store = Datastore(args.datastore)
        for key, value in asdict(store.manifest).items():
            print(f"{key}: {value}")
        return 0
    cfg = DatastoreConfig(inputs=args.input_dataset, output_dir=args.output_dir, input_format=args.input_format,
                          options=reader_options_from_args(args), clip_model=args.clip_model,
                          index_type=args.index_type, batch_size=args.batch_size, device=args.device,
                          append=args.append, progress=not args.no_progress)
    from prefixcap.interrupts import requested, stop_requests
    from prefixcap.retrieval.build import BuildInterrupted

    try:
        with stop_requests():  # Ctrl-C / SIGTERM: stop after the current batch (polled by the build)
            summary = build_datastore(cfg, should_stop=requested)
    except BuildInterrupted as err:
        print(f"{PROG}: interrupted; {err}", file=sys.stderr)
        return 130
    resumed = f", resumed at {summary.resumed_from}" if summary.resumed_from else ""
    print(f"datastore {summary.output_dir}: {summary.count} captions ({summary.added} added{resumed}), "
          f"{summary.embedding_dim}-d, {summary.index_type} index, {summary.seconds:.1f} s "
          f"({summary.captions_per_second:.0f} captions/s)", file=sys.stdout)
    return 0
