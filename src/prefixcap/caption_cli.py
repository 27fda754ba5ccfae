"""`prefixcap caption`: caption image files, folders, globs, datasets or embeddings into JSON Lines.

Every input item gives exactly one output line, in input order:
  {"key": ..., "caption": "..."}                      (one caption per image)
  {"key": ..., "captions": ["...", ...]}              (--num_return_sequences > 1)
  {"key": ..., "caption": "...", "score": -0.81}      (--scores)
  {"key": ..., "error": "truncated: image data ends early"}   (a broken input; the run goes on)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from prefixcap.caption import Captioner, GenerationSettings

logger = logging.getLogger("prefixcap.caption")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
GLOB_CHARS = set("*?[")
# Extensions that name a dataset format in --input_format auto.
AUTO_FORMATS = {".tar": "webdataset", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl"}
FORMATS = ("auto", "images", "preprocessed", "webdataset", "files", "parquet", "csv", "jsonl", "coco",
           "embeddings")


class CaptionInputError(ValueError):
    """An input argument that cannot be read as asked (named in the message)."""


@dataclass
class Item:
    """One thing to caption: image bytes/path, or a precomputed CLIP embedding, or an error to report."""

    key: str
    image: Any = None  # bytes or a path
    embedding: np.ndarray | None = None  # (C,)
    error: str | None = None


@dataclass
class Source:
    """A group of inputs read the same way."""

    input_format: str
    inputs: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs -> items
def classify(path: str) -> str:
    """--input_format auto: what one input argument is."""
    p = Path(path)
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return "preprocessed"
        if (p / "img_emb").is_dir() and (p / "metadata").is_dir():
            return "embeddings"
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


def _first_parquet_columns(inputs: list[str], sub: str | None = None) -> list[str]:
    import pyarrow.parquet as pq

    for item in inputs:
        root = Path(item) / sub if sub else Path(item)
        files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
        for f in files:
            if f.is_file() and f.suffix == ".parquet":
                return pq.ParquetFile(f).schema_arrow.names
    return []


def reader_items(source: Source, args: argparse.Namespace) -> Iterator[Item]:
    """Items from the preprocess stage's readers (webdataset, files, tables, COCO, embeddings)."""
    from prefixcap.data.decode import SKIP_REASONS
    from prefixcap.data.readers import InputError, ReaderConfig, make_reader

    caption_column = args.caption_column
    if caption_column is None:
        # Captions are not needed here, but the readers check the caption column exists; point
        # them at a column that does (the image column for tables, any column for embeddings).
        if source.input_format in ("parquet", "csv", "jsonl"):
            caption_column = args.image_column
        elif source.input_format == "embeddings":
            names = _first_parquet_columns(source.inputs, "metadata")
            caption_column = "caption" if "caption" in names or not names else names[0]
        else:
            caption_column = "caption"
    cfg = ReaderConfig(
        inputs=source.inputs, input_format=source.input_format, wds_image_key=args.wds_image_key,
        cache_path=args.cache_path, image_column=args.image_column, caption_column=caption_column,
        key_column=args.key_column, image_root=args.image_root, coco_split=args.coco_split,
    )
    try:
        reader = make_reader(cfg)
    except InputError as err:
        raise CaptionInputError(str(err)) from err
    for unit in range(len(reader.units())):
        for record in reader.records(unit):
            if record.reason:
                yield Item(record.key, error=f"{record.reason}: {SKIP_REASONS.get(record.reason, record.reason)}")
            elif record.embedding is not None:
                yield Item(record.key, embedding=record.embedding)
            else:
                yield Item(record.key, image=record.image)


def preprocessed_items(source: Source) -> Iterator[Item]:
    """One item per image of preprocessed dataset folders, with its stored CLIP embedding."""
    from prefixcap.data.shards import load_preprocessed

    for path in source.inputs:
        try:
            dataset = load_preprocessed(path)
        except (FileNotFoundError, OSError) as err:
            raise CaptionInputError(f"cannot open preprocessed dataset {path!r}: {err}") from err
        for i in range(dataset.num_images):
            key, embedding = dataset.image(i)
            yield Item(key, embedding=embedding)


def source_items(source: Source, args: argparse.Namespace) -> Iterator[Item]:
    if source.input_format == "images":
        for path in image_paths(source.inputs):
            yield Item(path, image=path)
    elif source.input_format == "preprocessed":
        yield from preprocessed_items(source)
    else:
        yield from reader_items(source, args)


def count_items(sources: list[Source]) -> int | None:
    """Total for the progress bar when it is known up front (images, preprocessed, embeddings)."""
    total = 0
    for source in sources:
        if source.input_format == "images":
            total += len(image_paths(source.inputs))
        elif source.input_format == "preprocessed":
            from prefixcap.data.shards import load_preprocessed

            total += sum(load_preprocessed(p).num_images for p in source.inputs)
        else:
            return None
    return total


def all_items(sources: list[Source], args: argparse.Namespace) -> Iterator[Item]:
    n = 0
    for source in sources:
        for item in source_items(source, args):
            if args.limit is not None and n >= args.limit:
                return
            n += 1
            yield item


# --------------------------------------------------------------------------- items -> captions
@dataclass
class Prepared:
    """A batch with every image item decoded and preprocessed (or turned into an error)."""

    items: list[Item]
    pixels: list[np.ndarray | None]


def _prepare_one(cap: Captioner, item: Item) -> np.ndarray | None:
    if item.error is not None or item.embedding is not None:
        return None
    try:
        return cap.preprocess(item.image)
    except Exception as err:  # noqa: BLE001 - a broken input is reported on its line; the run goes on
        item.error = str(err)
        return None


def prepared_batches(cap: Captioner, items: Iterator[Item], batch_size: int, pool: ThreadPoolExecutor,
                     prefetch: int = 2) -> Iterator[Prepared]:
    """Decode the next batches in worker threads while the current one is on the device."""
    pending: deque[tuple[list[Item], list[Future]]] = deque()

    def resolve(entry: tuple[list[Item], list[Future]]) -> Prepared:
        batch, futures = entry
        return Prepared(batch, [f.result() for f in futures])

    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            pending.append((batch, [pool.submit(_prepare_one, cap, it) for it in batch]))
            batch = []
            if len(pending) > prefetch:
                yield resolve(pending.popleft())
    if batch:
        pending.append((batch, [pool.submit(_prepare_one, cap, it) for it in batch]))
    while pending:
        yield resolve(pending.popleft())


def caption_batch(cap: Captioner, batch: Prepared, settings: GenerationSettings,
                  return_scores: bool) -> list[dict[str, Any]]:
    """One prepared batch -> one output record per item, in order."""
    rows: list[dict[str, Any]] = [{"key": item.key} for item in batch.items]
    image_idx = [i for i, (it, px) in enumerate(zip(batch.items, batch.pixels)) if px is not None]
    emb_idx = [i for i, it in enumerate(batch.items) if it.error is None and it.embedding is not None]
    parts, order = [], []
    if image_idx:
        pixels = torch.from_numpy(np.stack([batch.pixels[i] for i in image_idx]))  # (b, 3, H, W)
        parts.append(cap.encode_pixels(pixels).to(cap.device))  # (b, C)
        order += image_idx
    if emb_idx:
        embeddings = []
        for i in emb_idx:
            emb = np.asarray(batch.items[i].embedding, dtype=np.float32).reshape(-1)
            if emb.shape[0] != cap.config.mapping.prefix_size:
                batch.items[i].error = (f"embedding has {emb.shape[0]} values, the model expects "
                                        f"{cap.config.mapping.prefix_size}")
                continue
            embeddings.append(emb)
            order.append(i)
        if embeddings:
            parts.append(torch.from_numpy(np.stack(embeddings)).to(cap.device))  # (e, C)
    if parts:
        out = cap.generate(torch.cat(parts), settings, return_scores=return_scores)
        texts = cap.decode(out.tokens)
        n = settings.num_return_sequences
        for j, i in enumerate(order):
            group = texts[j * n:(j + 1) * n]
            if n == 1:
                rows[i]["caption"] = group[0]
            else:
                rows[i]["captions"] = group
            if out.scores is not None:
                scores = [round(s, 5) for s in out.scores[j * n:(j + 1) * n]]
                rows[i]["score" if n == 1 else "scores"] = scores[0] if n == 1 else scores
    for row, item in zip(rows, batch.items):
        if item.error is not None:
            row["error"] = item.error
    return rows


@dataclass
class RunSummary:
    items: int = 0
    captioned: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


def run(cap: Captioner, items: Iterator[Item], out: TextIO, settings: GenerationSettings,
        batch_size: int = 32, return_scores: bool = False, num_workers: int = 4,
        total: int | None = None, show_progress: bool = True) -> RunSummary:
    """Caption every item, writing one JSON line per item in input order."""
    from tqdm import tqdm

    summary = RunSummary()
    start = time.perf_counter()
    bar = tqdm(total=total, unit="img", desc="captioning", disable=not show_progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="prefixcap-caption") as pool:
        for batch in prepared_batches(cap, items, batch_size, pool):
            for row in caption_batch(cap, batch, settings, return_scores):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                summary.items += 1
                if "error" in row:
                    summary.errors += 1
                else:
                    summary.captioned += 1
            out.flush()
            bar.update(len(batch.items))
            bar.set_postfix(errors=summary.errors, refresh=False)
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefixcap caption",
        description="Caption images (files, folders, globs), datasets the preprocess stage reads, "
                    "preprocessed folders or clip-retrieval embeddings; writes JSON Lines.",
    )
    p.add_argument("inputs", nargs="*", help="image files, folders, globs, tars, tables, dataset folders")
    p.add_argument("--model", required=True, help="trained prefixcap model folder (or Hub id)")
    p.add_argument("--input_dataset", action="append", default=[],
                   help="more inputs (same as positional ones; may be repeated)")
    p.add_argument("--input_format", default="auto", choices=FORMATS,
                   help="auto: by input (folder with manifest.json: preprocessed; with img_emb/: embeddings; "
                        ".tar: webdataset; .parquet/.csv/.jsonl: tables; anything else: image files)")
    p.add_argument("--output", default="-", help="JSON Lines file to write ('-': stdout)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="weights dtype (default: as saved; the CLIP encoder uses float16 on GPU)")
    p.add_argument("--clip_model", default=None,
                   help="override the CLIP encoder named in the model's config (e.g. a local copy)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads decoding and preprocessing images")
    p.add_argument("--limit", type=int, default=None, help="stop after this many inputs")
    p.add_argument("--scores", action="store_true", help="add each caption's score to the output")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")

    gen = p.add_argument_group("decoding (passed to the language model's generate)")
    defaults = GenerationSettings()
    gen.add_argument("--num_beams", type=int, default=defaults.num_beams)
    gen.add_argument("--do_sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=defaults.temperature)
    gen.add_argument("--top_k", type=int, default=defaults.top_k)
    gen.add_argument("--top_p", type=float, default=defaults.top_p)
    gen.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)
    gen.add_argument("--length_penalty", type=float, default=defaults.length_penalty)
    gen.add_argument("--max_new_tokens", type=int, default=None,
                     help="default: the longest caption length the model was trained with")
    gen.add_argument("--num_return_sequences", type=int, default=defaults.num_return_sequences)

    data = p.add_argument_group("dataset inputs (as in `prefixcap preprocess`)")
    data.add_argument("--wds_image_key", default="jpg")
    data.add_argument("--cache_path", default=None, help="webdataset cache folder")
    data.add_argument("--image_column", default="image_path")
    data.add_argument("--caption_column", default=None)
    data.add_argument("--key_column", default=None)
    data.add_argument("--image_root", default=None)
    data.add_argument("--coco_split", default=None)
    return p


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(
        num_beams=args.num_beams, do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, length_penalty=args.length_penalty,
        max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_return_sequences,
    ).validate()


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    inputs = list(args.inputs) + list(args.input_dataset)
    if not inputs:
        parser.error("no inputs: give image files, folders, globs or datasets")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sources = group_sources(inputs, args.input_format)
    try:
        total = count_items(sources)
        if total is not None and args.limit is not None:
            total = min(total, args.limit)
    except (CaptionInputError, FileNotFoundError, OSError) as err:
        print(f"prefixcap caption: {err}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would drown the captioning bar
    try:
        cap = Captioner.from_pretrained(args.model, device=device, dtype=DTYPES.get(args.dtype),
                                        clip_model=args.clip_model)
        if any(s.input_format not in ("preprocessed", "embeddings") for s in sources):
            cap.encoder  # noqa: B018 - load CLIP now: a missing encoder fails the run, not every image
    except (OSError, ValueError) as err:  # missing folder, bad config, unloadable LM/CLIP: all named
        print(f"prefixcap caption: cannot load --model {args.model!r}: {err}", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            if args.output == "-":
                out: TextIO = sys.stdout
            else:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(open(args.output, "w", encoding="utf-8"))
            stack.callback(cap.close)
            summary = run(cap, all_items(sources, args), out, settings, batch_size=args.batch_size,
                          return_scores=args.scores, num_workers=args.num_workers, total=total,
                          show_progress=not args.no_progress)
    except CaptionInputError as err:
        print(f"prefixcap caption: {err}", file=sys.stderr)
        return 2
    where = "stdout" if args.output == "-" else args.output
    print(f"prefixcap caption: {summary.captioned} captioned, {summary.errors} errors, "
          f"{summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s) -> {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
