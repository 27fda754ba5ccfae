"""`prefixcap caption`: caption image files, folders, globs, datasets or embeddings into JSON Lines or shards.

With --output (or stdout) every input item gives exactly one output line, in input order:
  {"key": ..., "caption": "..."}                      (one caption per image)
  {"key": ..., "captions": ["...", ...]}              (--num_return_sequences > 1)
  {"key": ..., "caption": "...", "score": -0.81}      (--scores)
  {"key": ..., "error": "truncated: image data ends early"}   (a broken input; the run goes on)
With --output_dir every input shard gives one output shard (--output_format jsonl, parquet or
webdataset), resumable and split over the ranks of torchrun: see prefixcap.caption.sharded.
Inputs are read by prefixcap.caption.inputs and captioned by prefixcap.caption.pipeline; this module parses
flags and writes the lines. Exit codes: 0 when something was captioned, 1 when nothing could be
(every input failed, or embeddings of the wrong width), 2 for a wrong command line, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from prefixcap.caption.captioner import Captioner
from prefixcap.caption.inputs import FORMATS, CaptionInputError, CaptionInputs, count_items, iter_items, needs_encoder
from prefixcap.caption.writers import OUTPUT_FORMATS, WriterOptions, caption_member_problem, result_row
from prefixcap.data.readers import add_reader_args, reader_options_from_args
from prefixcap.errors import UsageError
from prefixcap.generation import GenerationSettings, add_generation_args, settings_from_args
from prefixcap.caption.pipeline import EmbeddingWidthError, Item, PipelineOptions, caption_batches
from prefixcap.caption.sharded import ShardOutputOptions

PROG = "prefixcap caption"
# The reader flags `caption` offers (captions are not read, so no caption-source flags), and its defaults.
READER_FLAGS = ("wds_image_key", "cache_path", "image_column", "caption_column", "key_column", "image_root",
                "coco_split", "hf_split", "hf_config", "hf_streaming")
READER_DEFAULTS = {"caption_column": None}


@dataclass
class CaptionJob:
    """Everything one `prefixcap caption` run needs, built from its flags."""

    model: str
    inputs: CaptionInputs
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    output: str = "-"  # JSON Lines file; "-" is stdout
    device: str | None = None
    dtype: str | None = None  # float32 | float16 | bfloat16; None: as saved
    clip_model: str | None = None  # override the CLIP encoder named in the model's config
    progress: bool = True
    shards: ShardOutputOptions | None = None  # --output_dir: one output shard per input shard


@dataclass
class RunSummary:
    items: int = 0
    captioned: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


def run(cap: Captioner, items: Iterable[Item], out: TextIO, options: PipelineOptions,
        total: int | None = None, show_progress: bool = True) -> RunSummary:
    """Caption every item, writing one JSON line per item in input order."""
    from tqdm import tqdm

    n = (options.settings or cap.settings).num_return_sequences
    summary = RunSummary()
    start = time.perf_counter()
    bar = tqdm(total=total, unit="img", desc="captioning", disable=not show_progress, dynamic_ncols=True)
    try:
        for results in caption_batches(cap, items, options):
            for result in results:
                out.write(json.dumps(result_row(result, n), ensure_ascii=False) + "\n")
            out.flush()
            summary.items += len(results)
            summary.errors += sum(r.error is not None for r in results)
            bar.update(len(results))
            bar.set_postfix(errors=summary.errors, refresh=False)
    finally:
        bar.close()
    summary.captioned = summary.items - summary.errors
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
                        "with .tar files: webdataset; .tar: webdataset; .parquet/.csv/.jsonl: tables; "
                        "anything else: image files)")
    p.add_argument("--output", default="-", help="JSON Lines file to write ('-': stdout)")
    shards = p.add_argument_group("re-captioning shards (--output_dir)")
    shards.add_argument("--output_dir", default=None,
                        help="write one output shard per input shard here (atomically; a rerun resumes; "
                             "ranks of torchrun split the shards)")
    shards.add_argument("--output_format", default=None, choices=OUTPUT_FORMATS,
                        help="format of the output shards (default jsonl)")
    shards.add_argument("--copy_members", action="store_true",
                        help="webdataset output: copy each input sample's members beside its caption")
    shards.add_argument("--caption_member", default="prefixcap.txt",
                        help="webdataset output: member suffix of the caption; the json member is named after "
                             "it (prefixcap.json)")
    shards.add_argument("--overwrite", action="store_true",
                        help="delete the captions already in --output_dir and start afresh")
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

    add_generation_args(p)  # one flag per GenerationSettings field, range-checked

    add_reader_args(p, title="dataset inputs (as in `prefixcap preprocess`)", only=READER_FLAGS,
                    defaults=READER_DEFAULTS)
    return p


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def job_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CaptionJob:
    """The typed job a parsed command line asks for; a wrong flag exits with the parser's usage error."""
    inputs = list(args.inputs) + list(args.input_dataset)
    if not inputs:
        parser.error("no inputs: give image files, folders, globs or datasets")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    return CaptionJob(
        model=args.model,
        inputs=CaptionInputs(inputs, args.input_format, reader_options_from_args(args), args.limit),
        pipeline=PipelineOptions(batch_size=args.batch_size, num_workers=args.num_workers,
                                 return_scores=args.scores, settings=settings),
        output=args.output, device=args.device, dtype=args.dtype, clip_model=args.clip_model,
        progress=not args.no_progress, shards=shard_options_from_args(parser, args))


def shard_options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ShardOutputOptions | None:
    """--output_dir and its flags; the shard-only flags without --output_dir are a usage error."""
    if args.output_dir is None:
        used = [f for f, on in (("--output_format", args.output_format is not None),
                                ("--copy_members", args.copy_members), ("--overwrite", args.overwrite),
                                ("--caption_member", args.caption_member != "prefixcap.txt")) if on]
        if used:
            parser.error(f"{', '.join(used)} only apply with --output_dir")
        return None
    if args.output != "-":
        parser.error("give either --output (one JSON Lines file) or --output_dir (one output shard per input shard)")
    if args.limit is not None:
        parser.error("--limit does not apply with --output_dir (every input shard is captioned whole)")
    fmt = args.output_format or "jsonl"
    if args.copy_members and (fmt != "webdataset" or args.input_format not in ("auto", "webdataset")):
        parser.error("--copy_members needs --output_format webdataset and webdataset (.tar) inputs")
    problem = caption_member_problem(args.caption_member)
    if problem:
        parser.error(problem)
    return ShardOutputOptions(args.output_dir, fmt, args.copy_members, args.caption_member, args.overwrite)


def load_captioner(job: CaptionJob) -> Captioner:
    """The model, and its CLIP encoder now when any input holds images (a missing one fails the run, not each image)."""
    from transformers.utils import logging as hf_logging

    from prefixcap.devices import resolve_device

    device = resolve_device(job.device, PROG)  # cuda without CUDA: cpu, with a notice
    hf_logging.disable_progress_bar()  # weight-loading bars would drown the captioning bar
    cap = Captioner.from_pretrained(job.model, device=device, dtype=DTYPES.get(job.dtype), clip_model=job.clip_model)
    if needs_encoder(job.inputs):
        cap.encoder  # noqa: B018
    return cap


def caption_job(job: CaptionJob, cap: Captioner, total: int | None = None) -> RunSummary:
    """Run the job into its --output (one writer per file); `total` sizes the progress bar."""
    from prefixcap.locking import output_lock

    with contextlib.ExitStack() as stack:
        if job.output == "-":
            out: TextIO = sys.stdout
        else:
            Path(job.output).parent.mkdir(parents=True, exist_ok=True)
            # one writer per output file: a second caption run into it is refused, naming the PID
            stack.enter_context(output_lock(job.output, PROG, kind="file", flag="--output"))
            out = stack.enter_context(open(job.output, "w", encoding="utf-8"))
        return run(cap, iter_items(job.inputs), out, job.pipeline, total=total, show_progress=job.progress)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    job = job_from_args(parser, parser.parse_args(argv))
    if job.shards is not None:
        return main_shards(job)
    try:
        total = count_items(job.inputs)  # a folder without images fails before the model loads
    except (CaptionInputError, FileNotFoundError, OSError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    try:
        cap = load_captioner(job)
    except (OSError, ValueError) as err:  # missing folder, bad config, unloadable LM/CLIP: all named
        print(f"{PROG}: cannot load --model {job.model!r}: {err}", file=sys.stderr)
        return 2
    from prefixcap.locking import OutputLockedError

    try:
        summary = caption_job(job, cap, total)
    except CaptionInputError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    except (OutputLockedError, EmbeddingWidthError) as err:  # another process writes --output; unusable inputs
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    finally:
        cap.close()
    where = "stdout" if job.output == "-" else job.output
    print(f"{PROG}: {summary.captioned} captioned, {summary.errors} errors, "
          f"{summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s) -> {where}", file=sys.stderr)
    if summary.captioned == 0:
        print(f"{PROG}: error: no input could be captioned"
              + (" (every one failed; see the error of each line)" if summary.items else " (no inputs found)"),
              file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- --output_dir: shards
def folder_settings(job: CaptionJob) -> dict[str, Any]:
    """What decides the captions of an output folder: a rerun must ask for the same (see recaption.check_settings)."""
    from prefixcap.caption.sharded import model_fingerprint

    settings = job.pipeline.settings or GenerationSettings()
    local = Path(job.model).is_dir()
    return {"model": str(Path(job.model).resolve()) if local else job.model,
            "model_sha256": model_fingerprint(job.model), "clip_model": job.clip_model, "dtype": job.dtype,
            "generation": asdict(settings.normalized()), "generate_kwargs": dict(job.pipeline.generate_kwargs)}


class _Loader:
    """Loads the captioner when the run finds work (a finished folder never loads the model)."""

    def __init__(self, job: CaptionJob):
        self.job = job
        self.cap: Captioner | None = None

    def __call__(self) -> Captioner:
        try:
            self.cap = load_captioner(self.job)
        except (OSError, ValueError) as err:  # missing folder, bad config, unloadable LM/CLIP: all named
            raise ModelLoadError(f"cannot load --model {self.job.model!r}: {err}") from err
        return self.cap


class ModelLoadError(UsageError):
    """The model (or its CLIP encoder) does not load; the message names it."""


def main_shards(job: CaptionJob) -> int:
    """`caption --output_dir`: this rank's unfinished shards; exit 0, 1 (nothing captioned), 2 or 130."""
    from prefixcap.locking import OutputLockedError
    from prefixcap.caption.sharded import make_plan, run_recaption

    assert job.shards is not None
    settings = job.pipeline.settings or GenerationSettings()
    options = replace(job.pipeline, return_scores=True, encode_ahead=True)  # scores go into every shard
    writer = WriterOptions(job.shards.output_format, settings.num_return_sequences, job.shards.caption_member,
                           job.shards.copy_members, model=job.model, generation=asdict(settings.normalized()))
    loader = _Loader(job)
    try:
        plan = make_plan(job.inputs, job.shards, folder_settings(job))
        other = [s.unit for s in plan.shards if s.unit.input_format != "webdataset"]
        if job.shards.copy_members and other:
            raise UsageError(f"--copy_members needs webdataset (.tar) inputs, but {other[0].name!r} is read as "
                             f"{other[0].input_format}")
        summary = run_recaption(plan, job.shards, loader, options, writer, job.progress)
    except UsageError as err:  # bad inputs, other settings in the folder, a model that does not load
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    except (OutputLockedError, EmbeddingWidthError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if loader.cap is not None:
            loader.cap.close()
    return report_shards(summary, job.shards.output_dir)


def report_shards(summary: Any, output_dir: str) -> int:
    """Print what this rank did and whether the folder is complete; the exit code."""
    who = f"rank {summary.rank}/{summary.world_size}: " if summary.world_size > 1 else ""
    mine = summary.shards_written + summary.shards_done_before
    if summary.shards_written:
        errors = ", ".join(f"{r}: {n}" for r, n in summary.errors.most_common())
        print(f"{PROG}: {who}{summary.shards_written} shards written ({summary.captioned} captioned, "
              f"{sum(summary.errors.values())} errors{f' ({errors})' if errors else ''}), "
              f"{summary.shards_done_before} already finished; {summary.seconds:.1f} s "
              f"({summary.captions_per_second:.1f} captions/s) -> {output_dir}", file=sys.stderr)
    elif mine:
        print(f"{PROG}: {who}all {mine} shards of this run were already finished in {output_dir}; nothing to do",
              file=sys.stderr)
    else:
        print(f"{PROG}: {who}no input shard falls to this rank ({summary.shards_total} shards, "
              f"{summary.world_size} ranks)", file=sys.stderr)
    if summary.summary is not None:
        s = summary.summary
        print(f"{PROG}: all {s['num_shards']} shards finished: {s['captioned']} captioned, {s['num_errors']} errors; "
              f"summary in {Path(output_dir) / 'caption_summary.json'}", file=sys.stderr)
    else:
        print(f"{PROG}: other ranks are still running; the last one to finish writes the summary", file=sys.stderr)
    if summary.shards_written and summary.captioned == 0:
        print(f"{PROG}: error: no input could be captioned (every one failed; see the shards' stats)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
