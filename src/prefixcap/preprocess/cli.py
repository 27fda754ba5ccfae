"""`prefixcap preprocess` / the seed's `create_dataset.py`: flags -> PreprocessConfig -> run_preprocess, printed.

Exit status: 0 done, 2 a refused input, flag or folder, 1 no usable sample or a busy output folder,
130 Ctrl-C (complete shards are kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import TYPE_CHECKING

from prefixcap.argtypes import ArgumentParser, DefaultsHelpFormatter, non_negative_int, positive_int
from prefixcap.data.decode import CONVERSIONS, SKIP_REASONS
from prefixcap.data.reader_args import add_reader_args, reader_options_from_args
from prefixcap.data.readers import READERS, InputError, ReaderOptions
from prefixcap.preprocess.run import PROG, PreprocessConfig, run_preprocess

if TYPE_CHECKING:
    from prefixcap.preprocess.progress import PreprocessSummary


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The one parser behind `prefixcap preprocess` and the root create_dataset.py."""
    from prefixcap.model.language_models import MODEL_TYPES

    d = PreprocessConfig()
    p = ArgumentParser(prog=prog, description="encode images with CLIP and tokenize captions into shards.",
                       formatter_class=DefaultsHelpFormatter)
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--input_dataset", nargs="+", required=True,
                     help='input: brace pattern ("./webdataset/{000..123}.tar"), folder, file(s), URL or pipe:')
    io_.add_argument("--output_folder", default=d.output_folder, help="folder for shards + manifest.json")
    io_.add_argument("--input_format", default=None, choices=sorted([*READERS, "text"]),
                     help="input format (text: .txt files of one caption per line, with --text_only); "
                          f"default: webdataset for .tar shards (or a folder of them), else {d.input_format}")
    io_.add_argument("--text_only", action="store_true",
                     help="no images: store each caption's CLIP text embedding (one row per caption) to train "
                          "a captioner from text alone (train then adds CapDec noise; see docs/text_only.md)")
    io_.add_argument("--subset_size", type=positive_int, default=None, help="stop after this many input samples")
    io_.add_argument("--samples_per_shard", type=positive_int, default=d.samples_per_shard,
                     help="input samples per output shard (also the unit of resume)")
    add_reader_args(p)  # the webdataset and table/coco/embeddings groups
    enc = p.add_argument_group("encoder and tokenizer")
    enc.add_argument("--clip_model", default=d.clip_model,
                     help="OpenAI name (ViT-B/32...), Hugging Face CLIP/SigLIP id, local folder, or open_clip:ARCH/PRETRAINED")
    enc.add_argument("--tokenizer_model_type", default=d.tokenizer_model_type, choices=list(MODEL_TYPES),
                     help="target LM family")
    enc.add_argument("--tokenizer_model_variant", default=d.tokenizer_model_variant,
                     help="Hugging Face LM name or local folder whose tokenizer is used")
    enc.add_argument("--max_token_length", type=positive_int, default=d.max_token_length,
                     help="captions are truncated to this many tokens (counted)")
    enc.add_argument("--prefix_length", type=positive_int, default=d.prefix_length, help="recorded for training")
    run = p.add_argument_group("speed")
    run.add_argument("--batch_size", type=positive_int, default=d.batch_size, help="images per encoder batch")
    run.add_argument("--num_prepro_workers", type=non_negative_int, default=d.num_prepro_workers,
                     help="image decoding worker processes (0: decode in the main process)")
    run.add_argument("--device", default=d.device, help="encoder device; falls back to cpu when CUDA is absent")
    run.add_argument("--max_image_pixels", type=positive_int, default=d.max_image_pixels,
                     help="larger images are skipped as decompression bombs")
    run.add_argument("--jpeg_draft", action="store_true",
                     help="let the JPEG decoder downscale while decoding (faster, pixels differ slightly)")
    run.add_argument("--no_progress", dest="progress", action="store_false", help="hide the progress bar")
    tok = p.add_argument_group("patch tokens (for the transformer_tokens / projector mappers)")
    tok.add_argument("--store_patch_tokens", action="store_true",
                     help="also store the encoder's final patch tokens (CLS + grid, projected; float16)")
    tok.add_argument("--patch_pool", type=positive_int, default=d.patch_pool,
                     help="average-pool the patch grid in P x P blocks before storing (CLS kept)")
    run.add_argument("--overwrite", action="store_true",
                     help="start --output_folder afresh: delete the dataset a previous run left there "
                          "(settings.json, shards/, progress/, manifest.json) instead of resuming it")
    return p


def _detected_format(inputs: list[str], prog: str) -> str:
    """No --input_format: .tar shards (named, brace patterns, or the .tar files of a folder) are webdataset,
    said on stderr; anything else is read as image files, as before."""
    from pathlib import Path

    from prefixcap.data.readers import expand_inputs

    names = expand_inputs(inputs)
    folders = [Path(n) for n in names if Path(n).is_dir()]
    files = [n for n in names if not Path(n).is_dir()]
    in_folders = [list(f.glob("*.tar")) for f in folders]
    tars = [n for n in files if n.lower().endswith(".tar")] + [t for found in in_folders for t in found]
    if tars and len(tars) - sum(map(len, in_folders)) == len(files) and all(in_folders):
        print(f"{prog}: reading {len(tars)} .tar shard(s) as --input_format webdataset (pass --input_format to "
              "choose another)", file=sys.stderr)
        return "webdataset"
    return PreprocessConfig().input_format


def parse_config(argv: list[str] | None = None, prog: str = PROG) -> PreprocessConfig:
    args = build_parser(prog).parse_args(argv)
    if args.input_format is None:
        args.input_format = _detected_format(args.input_dataset, prog)
    reader = reader_options_from_args(args)
    rest = {k: v for k, v in vars(args).items() if k not in {f.name for f in fields(ReaderOptions)}}
    return PreprocessConfig(reader=reader, **rest)


def print_summary(summary: PreprocessSummary, cfg: PreprocessConfig) -> None:
    """What this run wrote and what the whole dataset holds now (skips, conversions, truncations)."""
    rate = summary.num_images / summary.seconds if summary.seconds else 0.0
    out = [f"{PROG}: this run encoded {summary.num_images} images / {summary.num_captions} captions "
           f"into {summary.shards_written} shards in {summary.seconds:.1f}s ({rate:.1f} img/s)"]
    manifest = summary.manifest
    if manifest is None:
        out.append(f"  other ranks are still running; the last one to finish writes {cfg.output_folder}/manifest.json")
    else:
        out.append(f"  dataset {cfg.output_folder}: {manifest.num_images} images, {manifest.num_captions} captions, "
                   f"{len(manifest.shards)} shards, embedding_dim {manifest.embedding_dim}")
        out.append(f"  skipped {manifest.num_skipped}" + "".join(
            f"\n    {reason}: {n}  ({SKIP_REASONS.get(reason, '')})" for reason, n in manifest.skipped.items()))
        if manifest.converted:
            out.append("  converted" + "".join(f"\n    {name}: {n}  ({CONVERSIONS.get(name, '')})"
                                              for name, n in manifest.converted.items()))
        out.append(f"  captions truncated to {manifest.max_token_length} tokens: {manifest.num_truncated}")
        if manifest.text_only:
            out.append(f"  embeddings: CLIP text embeddings, one per caption ({manifest.text_only['encoder']}, "
                       f"context {manifest.text_only['context_length']} tokens; longer captions cut to it)")
        if manifest.patch_tokens:
            from prefixcap.model.patch_tokens import describe_storage

            out.append("  " + describe_storage(manifest.patch_tokens, manifest.num_images))
    print("\n".join(out))


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Exit status: 0 done, 2 a refused input/flag/folder, 1 nothing usable or a busy folder, 130 Ctrl-C."""
    cfg = parse_config(argv, prog)
    from prefixcap.cli_logging import library_messages_on_stderr
    from prefixcap.preprocess.progress import NoUsableSamplesError
    from prefixcap.runs import SettingsMismatchError
    from prefixcap.model.encoders import UnknownEncoderError
    from prefixcap.errors import PrefixcapError, exit_code_for
    from prefixcap.model.language_models import LanguageModelError
    from prefixcap.locking import OutputLockedError

    from prefixcap.interrupts import stop_requests

    try:
        with stop_requests(), library_messages_on_stderr():  # Ctrl-C: stop after the current batch
            summary = run_preprocess(cfg)
    except (InputError, SettingsMismatchError, UnknownEncoderError, LanguageModelError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except (NoUsableSamplesError, OutputLockedError) as err:  # ran, but nothing usable / folder busy
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except PrefixcapError as err:  # any other refusal or failure: its own exit code (errors.py)
        print(f"{prog}: error: {err}", file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; complete shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    print_summary(summary, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
