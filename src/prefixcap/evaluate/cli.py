"""`prefixcap evaluate`: the command line (flags -> EvaluateConfig -> evaluate -> report)."""

from __future__ import annotations

import argparse
import sys

from prefixcap.argtypes import ArgumentParser
import prefixcap.evaluate.metrics as M
from prefixcap.data.reader_args import add_reader_args, reader_options_from_args
from prefixcap.errors import EXIT_RUNTIME, EXIT_USAGE
from prefixcap.evaluate.config import READER_FLAGS, EvaluateConfig
from prefixcap.evaluate.references import EvaluationError
from prefixcap.evaluate.report import markdown_report
from prefixcap.evaluate.run import evaluate
from prefixcap.evaluate.scoring import ALL_METRICS
from prefixcap.generation import GenerationSettings, add_generation_args, settings_from_args
from prefixcap.model.quantize import QuantizeError, check_quantize, list_quantize_modes


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="prefixcap evaluate",
        description="COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE), CLIPScore/RefCLIPScore and "
                    "diversity, for a predictions file or a model's captions.")
    src = p.add_argument_group("what to score")
    src.add_argument("--predictions", help="JSONL from `prefixcap caption` ({key, caption}) or COCO results json "
                                           "[{image_id, caption}]")
    src.add_argument("--references", help="COCO captions json, Karpathy dataset_*.json, preprocessed dataset "
                                          "folder, or JSONL {key, captions}")
    src.add_argument("--model", help="a trained prefixcap model folder: caption --dataset first, then score")
    src.add_argument("--dataset", help="evaluation set for --model (same formats as --references)")
    src.add_argument("--datastore", help="a retrieval model's caption datastore (default: the one it was trained "
                                         "with; docs/retrieval.md)")
    src.add_argument("--split", default="test", help="Karpathy split(s), comma-separated (default: test)")
    src.add_argument("--images", help="image folder (the COCO root for Karpathy files): CLIPScore, and --model "
                                      "on a json dataset")
    src.add_argument("--limit", type=int, help="evaluate only the first N images")
    r = p.add_argument_group("--model on any input the preprocess stage reads (same flags as preprocess)")
    r.add_argument("--input_format", help="read --dataset with the preprocess readers: webdataset, files, parquet, "
                                          "csv, jsonl, coco, embeddings or hf_dataset (several captions per image are grouped)")
    add_reader_args(r, only=READER_FLAGS)
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)")
    m.add_argument("--no_clipscore", action="store_true", help="leave CLIPScore/RefCLIPScore out")
    m.add_argument("--no_spice", action="store_true", help="leave SPICE out (it is slow)")
    m.add_argument("--clip_model", default="ViT-B/32",
                   help="CLIP for CLIPScore: OpenAI name, HF id or local folder (default ViT-B/32, as Hessel et al.)")
    m.add_argument("--tokenizer", choices=("auto", "ptb", "simple"), default="auto",
                   help="ptb = pycocoevalcap's Stanford PTBTokenizer (needs Java; comparable with published "
                        "numbers); simple = Java-free approximation (default: ptb when Java is present)")
    m.add_argument("--spice_timeout_s", type=float, default=3600)
    m.add_argument("--strict", action="store_true", help="stop at the first bad input instead of counting it")
    # The caption command's decoding flags, but one caption per image (that is what is scored).
    g = add_generation_args(p, exclude=("num_return_sequences",), title="decoding (--model)")
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    g.add_argument("--quantize", default=None, choices=list_quantize_modes(),
                   help="int8: the model's LM in int8 (CPU only), to measure what --quantize costs caption quality")
    o = p.add_argument_group("output")
    o.add_argument("--output_dir", default="evaluation", help="where metrics.json, metrics.md and "
                                                               "predictions.jsonl go (default: ./evaluation)")
    o.add_argument("--name", help="row label in the Markdown table (default: the model / predictions file name)")
    return p


def _settings(args: argparse.Namespace) -> GenerationSettings:
    try:
        return settings_from_args(args)
    except ValueError as err:
        raise EvaluationError(f"decoding flags: {err}") from err


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    wanted = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = [m for m in wanted if m not in ALL_METRICS]
    if unknown:
        raise EvaluationError(f"--metrics: unknown metric(s) {unknown}; expected some of {', '.join(ALL_METRICS)}")
    wanted = tuple(m for m in wanted if not (args.no_clipscore and m == "clipscore")
                   and not (args.no_spice and m == "spice"))
    if args.quantize is not None:
        if args.model is None:
            raise EvaluationError("--quantize applies to --model (the captions it generates), not to --predictions")
        try:
            check_quantize(args.quantize, args.device or "cpu")
        except QuantizeError as err:
            raise EvaluationError(str(err)) from err
    return EvaluateConfig(
        predictions=args.predictions, references=args.references, model=args.model, dataset=args.dataset,
        datastore=args.datastore,
        split=args.split, images=args.images, output_dir=args.output_dir, name=args.name, limit=args.limit,
        metrics=wanted, clip_model=args.clip_model, strict=args.strict, tokenizer=args.tokenizer,
        spice_timeout_s=args.spice_timeout_s, device=args.device, quantize=args.quantize, batch_size=args.batch_size,
        input_format=args.input_format, reader=reader_options_from_args(args),
        generation=_settings(args),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = evaluate(cfg)
    except EvaluationError as err:  # bad input or flags, named in the message
        print(f"prefixcap evaluate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (M.MetricError, OSError) as err:  # OSError names the file it could not read
        print(f"prefixcap evaluate: error: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    print(markdown_report(result, result["settings"]["name"]))
    print(f"wrote {', '.join(result['outputs'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
