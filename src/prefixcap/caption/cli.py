"""`prefixcap caption`: flags -> a CaptionJob -> prefixcap.caption.job -> a printed summary and the exit code.

With --output (or stdout) every input item gives exactly one output line, in input order:
  {"key": ..., "caption": "..."}                      (one caption per image)
  {"key": ..., "captions": ["...", ...]}              (--num_return_sequences > 1)
  {"key": ..., "caption": "...", "score": -0.81}      (--scores)
  {"key": ..., "error": "truncated: image data ends early"}   (a broken input; the run goes on)
With --output_dir every input shard gives one output shard (--output_format jsonl, parquet or
webdataset), resumable and split over the ranks of torchrun: see prefixcap.caption.sharded.
Inputs are read by prefixcap.caption.inputs, captioned by prefixcap.caption.pipeline and the run is
driven by prefixcap.caption.job; this module parses flags and prints. Exit codes: 0 when something
was captioned, 1 when nothing could be (every input failed, embeddings of the wrong width, a model
that does not load, a locked output), 2 for a wrong command line, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prefixcap.argtypes import ArgumentParser
from prefixcap.caption.inputs import FORMATS, CaptionInputs
from prefixcap.caption.job import DTYPES, PROG, CaptionJob, CaptionSummary, ModelLoadError, run_caption_job
from prefixcap.caption.pipeline import EmbeddingWidthError, PipelineOptions
from prefixcap.caption.sharded import RecaptionSummary, ShardOutputOptions
from prefixcap.caption.writers import OUTPUT_FORMATS, caption_member_problem
from prefixcap.data.reader_args import add_reader_args, reader_options_from_args
from prefixcap.errors import UsageError
from prefixcap.generation import GenerationSettings, add_generation_args, settings_from_args
from prefixcap.model.quantize import QuantizeError, check_quantize, list_quantize_modes

# The reader flags `caption` offers (captions are not read, so no caption-source flags), and its defaults.
READER_FLAGS = ("wds_image_key", "cache_path", "image_column", "caption_column", "key_column", "image_root",
                "coco_split", "hf_split", "hf_config", "hf_streaming")
READER_DEFAULTS = {"caption_column": None}


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
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
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"images per encoder/LM batch; unset: {DEFAULT_ROWS} sequences' worth, "
                        f"{DEFAULT_ROWS} // max(num_beams, num_return_sequences) (default: {DEFAULT_ROWS} greedy, "
                        f"{DEFAULT_ROWS // 5} at beam 5)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="weights dtype (default: as saved; the CLIP encoder uses float16 on GPU)")
    p.add_argument("--quantize", default=None, choices=list_quantize_modes(),
                   help="int8: the LM's linear layers in int8 (CPU only; faster decoding, captions may "
                        "differ slightly from fp32; docs/caption.md)")
    p.add_argument("--clip_model", default=None,
                   help="override the CLIP encoder named in the model's config (e.g. a local copy)")
    p.add_argument("--datastore", default=None, help="a retrieval model's caption datastore (default: the one it "
                   "was trained with; docs/retrieval.md)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads decoding and preprocessing images")
    p.add_argument("--limit", type=int, default=None, help="stop after this many inputs")
    p.add_argument("--scores", action="store_true", help="add each caption's score to the output")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")

    add_generation_args(p)  # one flag per GenerationSettings field, range-checked

    add_reader_args(p, title="dataset inputs (as in `prefixcap preprocess`)", only=READER_FLAGS,
                    defaults=READER_DEFAULTS)
    return p


# Sequences decoded at once by default. Measured with bench/bench_limits.py (2 cores, GPT-2 small, fp32, packed
# layers, 2026-12-06): greedy captions/s by batch 32: 23.1, 64: 24.9, 128: 26.4, 256: 25.9; beam 5 by batch
# 16: 5.84, 32: 5.54, 64: 5.16 (at 320+ rows reordering the beams' caches costs more than bigger GEMMs save).
# Both peak near 128-160 rows, so the default batch is 128 rows' worth of images.
DEFAULT_ROWS = 128


def default_batch_size(settings: GenerationSettings) -> int:
    """Images per batch when --batch_size is not given: DEFAULT_ROWS sequences in the LM at once."""
    return max(1, DEFAULT_ROWS // max(settings.num_beams, settings.num_return_sequences))


def job_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CaptionJob:
    """The typed job a parsed command line asks for; a wrong flag exits with the parser's usage error."""
    inputs = list(args.inputs) + list(args.input_dataset)
    if not inputs:
        parser.error("no inputs: give image files, folders, globs or datasets")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.quantize is not None:
        try:
            check_quantize(args.quantize, args.device or "cpu", DTYPES.get(args.dtype))
        except QuantizeError as err:
            parser.error(str(err))
    return CaptionJob(
        model=args.model,
        inputs=CaptionInputs(inputs, args.input_format, reader_options_from_args(args), args.limit),
        pipeline=PipelineOptions(batch_size=args.batch_size or default_batch_size(settings),
                                 num_workers=args.num_workers, return_scores=args.scores, settings=settings),
        output=args.output, device=args.device, dtype=args.dtype, clip_model=args.clip_model,
        progress=not args.no_progress, shards=shard_options_from_args(parser, args), datastore=args.datastore,
        quantize=args.quantize)


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


# --------------------------------------------------------------------------- running
def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 something captioned, 2 a wrong command line or input, 1 a failed run, 130 Ctrl-C."""
    from prefixcap.interrupts import stop_requests
    from prefixcap.locking import OutputLockedError

    parser = build_parser()
    job = job_from_args(parser, parser.parse_args(argv))
    try:
        with stop_requests():  # Ctrl-C: stop after the current batch
            summary = run_caption_job(job)
    except UsageError as err:  # no images in a folder, an unknown input, other settings in --output_dir
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    except (ModelLoadError, OutputLockedError, EmbeddingWidthError) as err:  # the run cannot go on
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if job.shards is None:
            raise  # prefixcap.cli reports it (130); a --output file simply ends early
        print(f"{PROG}: interrupted; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    if isinstance(summary, RecaptionSummary):
        return report_shards(summary, job.shards.output_dir)
    return report_output(summary, job.output)


def report_output(summary: CaptionSummary, output: str) -> int:
    """Print what a run into one JSON Lines output did; the exit code."""
    where = "stdout" if output == "-" else output
    print(f"{PROG}: {summary.captioned} captioned, {summary.errors} errors, "
          f"{summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s) -> {where}", file=sys.stderr)
    if summary.captioned == 0:
        print(f"{PROG}: error: no input could be captioned"
              + (" (every one failed; see the error of each line)" if summary.items else " (no inputs found)"),
              file=sys.stderr)
        return 1
    return 0


def report_shards(summary: RecaptionSummary, output_dir: str) -> int:
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
