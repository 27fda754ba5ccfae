"""`prefixcap train` / the seed's `python3 train.py`: flags -> TrainConfig -> `prefixcap.train.run.train`, printed.

Exit status: 0 done, 2 a refused flag or configuration, 1 a failure while running, 130 Ctrl-C
(with a hint naming the checkpoint to resume from).
"""

from __future__ import annotations

import argparse
import os
import sys

from prefixcap.argtypes import ArgumentParser, DefaultsHelpFormatter, non_negative_int, positive_int
from prefixcap.train.config import HF_KWARGS, MIXED_PRECISION, TRACKERS, TrainConfig, TrainResult
from prefixcap.runs import is_main_process
from prefixcap.train.run import train

PROG = "prefixcap train"


# --- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The one parser behind `prefixcap train` and the root train.py (the seed's flags first)."""
    d = TrainConfig()
    p = ArgumentParser(
        prog=PROG, description="Train a ClipCap-style mapping network on a preprocessed dataset.",
        formatter_class=DefaultsHelpFormatter)
    _add_seed_args(p, d)
    _add_training_args(p, d)
    _add_validation_args(p, d)
    _add_adaptation_args(p, d)
    _add_loading_args(p, d)
    return p


def _add_seed_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    from prefixcap.model.mapping import MAPPERS

    s = p.add_argument_group("the seed's flags")
    s.add_argument("--data_dir", default=d.data_dir, help="preprocessed dataset folder (prefixcap preprocess)")
    s.add_argument("--output_dir", default=d.output_dir, help="where checkpoints and the model are written")
    s.add_argument("--output_filename_prefix", default=d.output_filename_prefix, help="checkpoint name prefix")
    s.add_argument("--epochs", type=positive_int, default=d.epochs)
    s.add_argument("--save_every_epochs", type=non_negative_int, default=d.save_every_epochs,
                   help="write {prefix}_{epoch}.ckpt every N epochs, epochs counted from 0 as in the seed "
                        "(demo_model_0.ckpt is the first); 0: never")
    s.add_argument("--save_every_steps", type=non_negative_int, default=d.save_every_steps,
                   help="rewrite {prefix}_latest.ckpt every N optimizer steps (0: only at epoch ends)")
    s.add_argument("--prefix_length", type=positive_int, default=None,
                   help="K prefix embeddings (default: the dataset's, else 10); another K than the dataset's "
                        "is accepted with a notice (the shards do not depend on K)")
    s.add_argument("--prefix_size", type=positive_int, default=None,
                   help="CLIP embedding size (default: the dataset's); must match the dataset's")
    s.add_argument("--clip_prefix_length", type=positive_int, default=d.clip_prefix_length,
                   help="the transformer mapper's L clip tokens")
    s.add_argument("--language_model_type", default=None, help="gpt2 | gpt-j | t5 | t0 | auto (default: the dataset's)")
    s.add_argument("--language_model_variant", default=None,
                   help="LM hub id or folder (default: the one the dataset was tokenized for)")
    s.add_argument("--batch_size", type=positive_int, default=d.batch_size, help="captions per process per step")
    s.add_argument("--only_prefix", action="store_true", help="freeze the LM; train only the mapping network")
    s.add_argument("--mapping_type", choices=sorted(MAPPERS), default=d.mapping_type)
    s.add_argument("--num_layers", type=positive_int, default=d.num_layers, help="transformer mapper layers")
    s.add_argument("--num_attention_heads", type=positive_int, default=d.num_attention_heads,
                   help="transformer mapper attention heads")
    s.add_argument("--normalize_prefix", action="store_true", help="L2-normalise CLIP embeddings (saved with the model)")
    s.add_argument("--noise_variance", type=_non_negative_float, default=None,
                   help="CapDec: add Gaussian noise of this variance to the normalised embeddings while training "
                        "(turns --normalize_prefix on); default 0.016 on a text-only dataset, else 0")
    s.add_argument("--use_deepspeed", action="store_true", help="DeepSpeed ZeRO through Accelerate (GPU only)")
    s.add_argument("--gpu_devices", default=None,
                   help='"0", "0,1,..." or "-1" for all GPUs ("cpu" forces the CPU); default "0", '
                        "or the devices a launcher assigned")


def _add_training_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--language_model", default=None, help="LM hub id or folder; overrides --language_model_variant")
    t.add_argument("--lr", type=float, default=d.lr)
    warm = t.add_mutually_exclusive_group()
    warm.add_argument("--warmup_steps", type=non_negative_int, default=d.warmup_steps,
                      help="linear warm-up over N optimizer steps, then linear decay")
    warm.add_argument("--warmup_ratio", type=_ratio, default=None,
                      help="warm up over this fraction of the run's optimizer steps instead (e.g. 0.1)")
    t.add_argument("--weight_decay", type=float, default=d.weight_decay)
    t.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    t.add_argument("--gradient_accumulation_steps", type=positive_int, default=d.gradient_accumulation_steps)
    t.add_argument("--mixed_precision", choices=MIXED_PRECISION, default=d.mixed_precision,
                   help="auto: bf16 on a GPU that supports it, else fp32; always fp32 on the CPU")
    t.add_argument("--deepspeed_stage", type=int, choices=(1, 2), default=d.deepspeed_stage, help="ZeRO stage")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--max_steps", type=non_negative_int, default=d.max_steps,
                   help="stop after this many optimizer steps in total (0: no limit)")
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from {prefix}_latest.ckpt in --output_dir (or from the given checkpoint)")
    t.add_argument("--overwrite_output_dir", action="store_true",
                   help="delete a previous run's {prefix}_* checkpoints in --output_dir first (without it, "
                        "and without --resume, such a folder is refused)")
    t.add_argument("--save_total_limit", type=non_negative_int, default=d.save_total_limit,
                   help="keep only the N newest {prefix}_{epoch}.ckpt (_latest and _final are always kept; 0: all)")
    t.add_argument("--threads", type=non_negative_int, default=d.threads,
                   help="torch threads per process (0: torch's default, one per core); 1 is often much "
                        "faster on a busy machine or with tiny models")


def _add_validation_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    v = p.add_argument_group("validation and logging")
    v.add_argument("--val_fraction", type=float, default=d.val_fraction,
                   help="hold out this fraction of the images (with all their captions) for validation")
    v.add_argument("--val_data_dir", default=None, help="a separate preprocessed validation dataset")
    v.add_argument("--eval_every_steps", type=non_negative_int, default=d.eval_every_steps,
                   help="validation loss every N steps (and at each epoch end)")
    v.add_argument("--eval_cider_images", type=non_negative_int, default=d.eval_cider_images,
                   help="also caption N validation images at each validation and report CIDEr")
    v.add_argument("--log_with", choices=TRACKERS, default=None, help="experiment tracker (through Accelerate)")
    v.add_argument("--logging_dir", default=None, help="tracker folder (default: {output_dir}/logs)")
    v.add_argument("--log_every_steps", type=positive_int, default=d.log_every_steps)


def _add_adaptation_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    lm = p.add_argument_group("LM adaptation and memory (frozen: --only_prefix; LoRA: --lora_rank; else fine-tuned)")
    lm.add_argument("--lora_rank", type=non_negative_int, default=d.lora_rank,
                    help="train LoRA adapters of this rank in the LM instead of all its weights (0: off; e.g. 8)")
    lm.add_argument("--lora_alpha", type=float, default=d.lora_alpha, help="LoRA scaling numerator (scale alpha/rank)")
    lm.add_argument("--lora_dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input")
    lm.add_argument("--lora_target_modules", default=None,
                    help="comma-separated LM module names to adapt (default per LM type: GPT-2 c_attn,c_proj; "
                         "T5 q,v; Llama-like q_proj,v_proj)")
    lm.add_argument("--merge_lora", action="store_true",
                    help="save the final model with the adapter merged into full LM weights (lm/) instead of "
                         "the small adapter")
    lm.add_argument("--gradient_checkpointing", action="store_true",
                    help="recompute the LM's activations in the backward pass: less memory, ~20-30%% slower")
    r = p.add_argument_group("retrieval augmentation (docs/retrieval.md)")
    r.add_argument("--datastore", default=None, help="a caption datastore (prefixcap datastore build): each image's "
                   "nearest captions, its own left out, prompt the LM (SmallCap)")
    r.add_argument("--retrieval_k", type=positive_int, default=d.retrieval_k, help="retrieved captions per image")
    hub = p.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push_to_hub", metavar="REPO", default=None,
                     help="upload the final model (with its model card) to this Hub repo at the end")
    hub.add_argument("--hub_private", action="store_true", help="create the --push_to_hub repo as private")


def _add_loading_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    dl = p.add_argument_group("data loading")
    dl.add_argument("--num_workers", type=non_negative_int, default=d.num_workers, help="DataLoader worker processes")
    dl.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=d.group_by_length,
                    help="batch captions of similar length together (less padding)")
    hf = p.add_argument_group("Hugging Face from_pretrained arguments (the seed's **huggingface_kwargs)")
    for name, (kind, help_) in HF_KWARGS.items():
        if kind is bool:
            hf.add_argument(f"--{name}", action="store_true", default=None, help=help_)
        else:
            hf.add_argument(f"--{name}", type=kind, default=None, help=help_)


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}")
    return number


def _ratio(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value!r}") from None
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value!r}")
    return number


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig. Unknown flags are errors (argparse exits with status 2 naming them)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (Hugging Face keyword arguments "
                     f"accepted: {', '.join('--' + k for k in HF_KWARGS)})")
    values = vars(args)
    hf_kwargs = {k: v for k in HF_KWARGS if (v := values.pop(k)) is not None}
    return TrainConfig(**values, hf_kwargs=hf_kwargs)


# --- running ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a refused flag or configuration, 1 a failure while running, 130 Ctrl-C."""
    from prefixcap.cli_logging import library_messages_on_stderr
    from prefixcap.errors import PrefixcapError, exit_code_for
    from prefixcap.interrupts import stop_requests

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after tokenizers ran
    cfg = parse_config(argv)
    main_process = is_main_process()
    try:
        with stop_requests(), library_messages_on_stderr():  # Ctrl-C: stop after the current step
            result = train(cfg, argv)
    except PrefixcapError as err:  # TrainConfigError (2), TrainRuntimeError / OutputLockedError (1), ...
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt:
        if main_process:
            print(f"\n{_interrupted_hint(cfg)}", file=sys.stderr)
        return 130
    if result is not None and main_process:  # None: the processes of a multi-GPU relaunch reported
        print_report(result)
    return 0


def print_report(r: TrainResult) -> None:
    """The run's one-screen summary (also in {prefix}_summary.json)."""
    lines = [(f"{PROG}: done: {r.epochs_completed} epoch(s), {r.global_step} steps, "
              f"{r.samples_seen:,} samples; {r.train_seconds:.1f}s this run, "
              f"{r.samples_per_second:,.1f} samples/s")]
    if r.epoch_train_losses:
        lines.append("  train loss per epoch (this run): " + ", ".join(f"{x:.4f}" for x in r.epoch_train_losses))
    if r.val_losses:
        lines.append(f"  validation loss: {r.val_losses[-1]['loss']:.4f}")
    if r.cider:
        lines.append(f"  CIDEr: {r.cider[-1]['cider']:.3f}")
    if r.checkpoints:
        lines.append("  checkpoints: " + ", ".join(r.checkpoints))
    print("\n".join(lines), flush=True)


def _interrupted_hint(cfg: TrainConfig) -> str:
    from prefixcap.train.checkpoint import checkpoint_path, has_checkpoint, load_checkpoint

    latest = checkpoint_path(cfg.output_dir, cfg.output_filename_prefix, "latest")
    if not has_checkpoint(latest):
        return f"{PROG}: interrupted before the first checkpoint; rerun the same command to start again"
    try:
        step = f" (step {load_checkpoint(latest).state.global_step})"
    except Exception:  # noqa: BLE001 - the hint must not fail; the step is a nicety
        step = ""
    return f"{PROG}: interrupted; {latest}{step} is kept: rerun the same command with --resume to continue from it"


if __name__ == "__main__":
    sys.exit(main())
