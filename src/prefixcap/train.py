"""The train stage: fit the mapping network (and optionally the LM) on a preprocessed dataset.

`prefixcap train [flags]` and the seed's `python3 train.py [flags]` share this parser. One code
path (Hugging Face Accelerate) runs on the CPU, one GPU, several GPUs or nodes (`accelerate
launch` / `torchrun`) and under DeepSpeed ZeRO.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefixcap.argtypes import DefaultsHelpFormatter, non_negative_int, positive_int

# Hugging Face keyword arguments forwarded to `from_pretrained` (the seed's **huggingface_kwargs);
# any other unknown flag is an error. name -> (type, help); bool ones are plain switches.
HF_KWARGS: dict[str, tuple[type, str]] = {
    "cache_dir": (str, "Hugging Face cache folder"),
    "revision": (str, "model revision (branch, tag or commit)"),
    "token": (str, "Hugging Face access token"),
    "trust_remote_code": (bool, "allow models that ship their own code"),
    "local_files_only": (bool, "never download, use the local cache only"),
    "force_download": (bool, "download again even if cached"),
    "attn_implementation": (str, "LM attention kernel: eager, sdpa, flash_attention_2 (LM only)"),
}
_TOKENIZER_KWARGS = ("cache_dir", "revision", "token", "trust_remote_code", "local_files_only", "force_download")

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb")


class TrainConfigError(ValueError):
    """A refused configuration: the message names the flag and what was expected (exit status 2)."""


class TrainRuntimeError(RuntimeError):
    """The run could not go on (e.g. a checkpoint that cannot be loaded): one line, exit status 1."""


@dataclass
class TrainConfig:
    """Every setting of a training run (the seed's flags first; defaults as the seed's)."""

    data_dir: str = "./train/"
    output_dir: str = "./models/"
    output_filename_prefix: str = "demo_model"
    epochs: int = 10
    save_every_epochs: int = 1
    save_every_steps: int = 10000
    prefix_length: int | None = None  # K; None: the dataset's (manifest), else 10; any K trains on any dataset
    prefix_size: int | None = None  # C; None: the dataset's embedding size
    clip_prefix_length: int = 10  # L of the transformer mapper
    language_model_type: str | None = None  # gpt2 | gpt-j | t5 | t0 | auto; None: the dataset's
    language_model_variant: str | None = None  # hub id or folder; None: the dataset's tokenizer
    language_model: str | None = None  # overrides language_model_variant
    batch_size: int = 256  # per process
    only_prefix: bool = False
    mapping_type: str = "mlp"
    num_layers: int = 8
    num_attention_heads: int = 8
    normalize_prefix: bool = False
    use_deepspeed: bool = False
    deepspeed_stage: int = 2
    gpu_devices: str | None = None  # None: "0", unless a launcher already assigned devices
    lr: float = 2e-5
    warmup_steps: int = 5000
    warmup_ratio: float | None = None  # fraction of the run's optimizer steps; replaces warmup_steps when set
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping (as the original)
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"
    seed: int = 42
    val_fraction: float = 0.0
    val_data_dir: str | None = None
    eval_every_steps: int = 0  # 0: validate at the end of each epoch only
    eval_cider_images: int = 0  # >0: also caption that many validation images and report CIDEr
    resume: str | None = None  # "latest" or a checkpoint folder
    num_workers: int = 4
    group_by_length: bool = True
    log_with: str | None = None
    logging_dir: str | None = None
    log_every_steps: int = 50
    max_steps: int = 0  # 0: no limit; else stop after this many optimizer steps in total
    overwrite_output_dir: bool = False  # delete a previous run's {prefix} checkpoints instead of refusing
    save_total_limit: int = 0  # keep only the N newest {prefix}_{epoch}.ckpt (0: keep all)
    threads: int = 0  # torch intra-op threads; 0: torch's default (one per core)
    lora_rank: int = 0  # >0: train LoRA adapters of this rank in the LM (base weights frozen)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: str | None = None  # comma-separated; None: the LM type's default (adapters.LORA_TARGETS)
    merge_lora: bool = False  # the final model gets the adapter merged into full LM weights (lm/)
    gradient_checkpointing: bool = False  # recompute LM activations in the backward pass (less memory)
    push_to_hub: str | None = None  # Hub repo id the final model is uploaded to
    hub_private: bool = False
    hf_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a run did; also written as `{prefix}_summary.json`."""

    epochs_completed: int = 0
    global_step: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0
    samples_per_second: float = 0.0
    epoch_train_losses: list[float] = field(default_factory=list)
    val_losses: list[dict[str, float]] = field(default_factory=list)
    cider: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    device: str = ""
    num_processes: int = 1
    resumed_from: str | None = None


# --- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="prefixcap train", description="Train a ClipCap-style mapping network on a preprocessed dataset.",
        formatter_class=DefaultsHelpFormatter)
    from prefixcap.mapping import MAPPERS

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
    s.add_argument("--use_deepspeed", action="store_true", help="DeepSpeed ZeRO through Accelerate (GPU only)")
    s.add_argument("--gpu_devices", default=None,
                   help='"0", "0,1,..." or "-1" for all GPUs ("cpu" forces the CPU); default "0", '
                        "or the devices a launcher assigned")

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
    hub = p.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push_to_hub", metavar="REPO", default=None,
                     help="upload the final model (with its model card) to this Hub repo at the end")
    hub.add_argument("--hub_private", action="store_true", help="create the --push_to_hub repo as private")

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
    return p


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


# --- devices -------------------------------------------------------------------------------
def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def select_devices(gpu_devices: str | None) -> tuple[bool, int]:
    """Apply --gpu_devices before CUDA starts: (use the CPU?, GPUs requested for this node).

    "0" is GPU 0 (the seed read it as "no GPU"), "0,1" those GPUs, "-1" all, "cpu" none.
    Under a launcher without an explicit value the launcher's assignment is kept.
    """
    import torch

    if gpu_devices is None:
        if _launched():
            return not torch.cuda.is_available(), 1
        gpu_devices = "0"
    value = gpu_devices.strip().lower()
    if value == "cpu":
        return True, 0
    if value != "-1":
        ids = [x.strip() for x in value.split(",") if x.strip()]
        if not ids or not all(x.isdigit() for x in ids):
            raise TrainConfigError(f'--gpu_devices {gpu_devices!r}: expected "0", "0,1,...", "-1" (all) or "cpu"')
        if not torch.cuda.is_initialized():
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        if not torch.cuda.is_available():
            return True, 0
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if _launched() and len(ids) < local_world:
            raise TrainConfigError(f"--gpu_devices {gpu_devices!r} names {len(ids)} GPU(s) but the launcher "
                                   f"started {local_world} processes on this node; name one GPU per process "
                                   "or leave --gpu_devices out to keep the launcher's assignment")
        found = torch.cuda.device_count()
        if found < len(ids):
            print(f"prefixcap train: notice: --gpu_devices {gpu_devices!r} names {len(ids)} GPUs but only "
                  f"{found} exist; using {found}", file=sys.stderr)
        return False, min(found, len(ids))
    return not torch.cuda.is_available(), max(torch.cuda.device_count(), 1)


def _relaunch(argv: list[str], nproc: int) -> int:
    """Several GPUs asked for without a launcher: rerun this command under torchrun, one process each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "prefixcap.train", *argv]
    print(f"prefixcap train: {nproc} GPUs requested; launching {nproc} processes: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


# --- model configuration from the dataset's manifest ----------------------------------------
def resolve_model(cfg: TrainConfig, manifest: dict[str, Any], embedding_dim: int, max_caption_tokens: int):
    """Build (CaptionConfig, lm, tokenizer), refusing settings that contradict the dataset."""
    from prefixcap.language_models import (
        LanguageModelError,
        detect_family,
        family_of_type,
        load_language_model,
        load_tokenizer,
        tokenizer_fingerprint,
    )
    from prefixcap.mapping import MappingConfig, with_token_input
    from prefixcap.model import CaptionConfig

    where = f"the dataset {cfg.data_dir}"
    dim = int(manifest.get("embedding_dim") or embedding_dim)
    if cfg.prefix_size is not None and cfg.prefix_size != dim:
        raise TrainConfigError(
            f"--prefix_size {cfg.prefix_size} conflicts with {where}: its CLIP embeddings "
            f"({manifest.get('clip_model', 'unknown encoder')}) are {dim}-d; omit --prefix_size or pass {dim}")
    data_k = manifest.get("prefix_length")
    if cfg.prefix_length is not None and data_k is not None and cfg.prefix_length != int(data_k):
        # The shards hold embeddings and tokens only; K is the mapper's, so the seed's own README
        # (preprocess with 10, train with 40) must work. The manifest's K is only the default.
        print(f"prefixcap train: notice: --prefix_length {cfg.prefix_length} (the dataset was preprocessed with "
              f"{data_k}, which is only the default; the shards do not depend on it)", file=sys.stderr)
    k = cfg.prefix_length or (int(data_k) if data_k is not None else 10)

    data_tok = manifest.get("tokenizer")
    name = cfg.language_model or cfg.language_model_variant or data_tok or "gpt2-xl"
    flag = "--language_model" if cfg.language_model else "--language_model_variant"
    hf = cfg.hf_kwargs
    tok_kwargs = {k_: v for k_, v in hf.items() if k_ in _TOKENIZER_KWARGS}
    try:
        if cfg.language_model_type:
            family = family_of_type(cfg.language_model_type, name, **tok_kwargs)
        elif name == data_tok and manifest.get("lm_family"):
            family = manifest["lm_family"]
        else:
            family = detect_family(name, **tok_kwargs)
        tokenizer = load_tokenizer(name, **tok_kwargs)
    except LanguageModelError as err:
        raise TrainConfigError(f"{flag} {name}: {err}") from err
    data_family = manifest.get("lm_family")
    if data_family and family != data_family:
        raise TrainConfigError(
            f"{flag} {name} is a {family} LM but {where} was tokenized for a {data_family} LM "
            f"({data_tok}); captions are framed differently for the two, so preprocess again for {name}")
    expected = manifest.get("tokenizer_fingerprint")
    if expected is None and data_tok and data_tok != name:
        try:
            expected = tokenizer_fingerprint(load_tokenizer(data_tok, **tok_kwargs))
        except LanguageModelError:
            print(f"prefixcap train: notice: cannot load the dataset's tokenizer {data_tok!r} to check it "
                  f"matches {name!r}; continuing unchecked", file=sys.stderr)
    actual = tokenizer_fingerprint(tokenizer)
    if expected is not None and {k_: expected.get(k_) for k_ in actual} != actual:
        raise TrainConfigError(
            f"{flag} {name} has a different tokenizer ({actual}) from the one {where} was tokenized with "
            f"({data_tok}: {expected}); train with --language_model {data_tok} or preprocess the data again "
            f"with --tokenizer_model_variant {name}")
    try:
        lm = load_language_model(name, family, **hf)
    except LanguageModelError as err:
        raise TrainConfigError(f"{flag} {name}: {err}") from err
    except ImportError as err:  # e.g. --attn_implementation flash_attention_2 without flash_attn
        raise TrainConfigError(f"{flag} {name}: {_first_line(err)}") from err
    max_pos = getattr(lm.config, "max_position_embeddings", None) if family == "causal" else None
    if max_pos and k + max_caption_tokens > max_pos:
        raise TrainConfigError(
            f"--prefix_length {k} + the longest caption of {where} ({max_caption_tokens} tokens) exceeds "
            f"{name}'s {max_pos} positions; use a shorter prefix or preprocess with a smaller --max_token_length")
    mapping = MappingConfig(
        mapping_type=cfg.mapping_type, prefix_size=dim, lm_dim=int(lm.get_input_embeddings().embedding_dim),
        prefix_length=k, clip_length=cfg.clip_prefix_length, num_layers=cfg.num_layers,
        num_heads=cfg.num_attention_heads)
    try:  # token mappers: N tokens and their pooling from the manifest (the projector's K is N)
        mapping = with_token_input(mapping, manifest.get("patch_tokens"), where)
    except ValueError as err:
        raise TrainConfigError(str(err)) from err
    if mapping.mapping_type in ("transformer", "transformer_tokens") and mapping.lm_dim % mapping.num_heads:
        raise TrainConfigError(f"--num_attention_heads {cfg.num_attention_heads} does not divide {name}'s "
                               f"width {mapping.lm_dim}")
    config = CaptionConfig(
        clip_model=str(manifest.get("clip_model", "unknown")), language_model=name, lm_family=family,
        tokenizer=data_tok or name, mapping=mapping,
        normalize_prefix=cfg.normalize_prefix, only_prefix=cfg.only_prefix,
        max_token_length=int(manifest.get("max_token_length") or max_caption_tokens))
    config.lora = _lora_settings(cfg, lm)
    return config, lm, tokenizer


def _lora_settings(cfg: TrainConfig, lm):
    """--lora_* flags -> LoraSettings (None without --lora_rank); refuses contradictory flags."""
    from prefixcap.adapters import AdapterError, resolve_settings

    if not cfg.lora_rank:
        if cfg.merge_lora:
            raise TrainConfigError("--merge_lora merges a LoRA adapter: it needs --lora_rank")
        return None
    if cfg.only_prefix:
        raise TrainConfigError("--lora_rank trains adapters inside the LM, --only_prefix freezes it: give one of them")
    targets = [t.strip() for t in (cfg.lora_target_modules or "").split(",") if t.strip()]
    try:
        return resolve_settings(lm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets or None)
    except AdapterError as err:
        raise TrainConfigError(str(err)) from err


# --- the run ---------------------------------------------------------------------------------
_RESUME_KEYS = ("batch_size", "seed", "gradient_accumulation_steps", "group_by_length", "num_processes",
                "num_train_captions", "val_fraction")
_MODEL_KEYS = ("lm_family", "normalize_prefix", "only_prefix", "mapping", "lora")


def _group_seed(seed: int, rank: int, step: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _check_data_dir(cfg: TrainConfig) -> None:
    folder = Path(cfg.data_dir)
    if not folder.exists():
        raise TrainConfigError(f"--data_dir {cfg.data_dir}: the folder does not exist (write one with "
                               "prefixcap preprocess --output_folder ...)")
    if not folder.is_dir():
        raise TrainConfigError(f"--data_dir {cfg.data_dir}: not a folder (expected a preprocessed dataset folder)")


def _check_attention(cfg: TrainConfig, cpu: bool) -> None:
    """--attn_implementation flash_attention_2 fails deep inside transformers with a traceback; say it first."""
    import importlib.util

    if cfg.hf_kwargs.get("attn_implementation") != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise TrainConfigError("--attn_implementation flash_attention_2: the flash_attn package is not installed "
                               "(pip install flash-attn, on a CUDA machine); or use sdpa (the default) or eager")
    if cpu:
        raise TrainConfigError("--attn_implementation flash_attention_2 needs a CUDA GPU and this run is on the "
                               "CPU; use sdpa (the default) or eager")


def _card_info(cfg: TrainConfig, manifest: dict[str, Any], num_train_captions: int) -> dict[str, Any]:
    """What the model card says about the training data (from the dataset's manifest)."""
    data = {"data_dir": Path(cfg.data_dir).name, "input_format": manifest.get("input_format"),
            "num_images": manifest.get("num_images"), "num_captions": manifest.get("num_captions"),
            "num_train_captions": num_train_captions, "clip_model": manifest.get("clip_model"),
            "datasets": list(manifest.get("hub_datasets") or [])}
    return {"training_data": {k: v for k, v in data.items() if v not in (None, [])}}


def _features(cfg: TrainConfig) -> str:
    """What the mapper reads from the shards: the pooled embedding or the patch tokens."""
    from prefixcap.mapping import TOKEN_MAPPERS

    return "patch_tokens" if cfg.mapping_type in TOKEN_MAPPERS else "embedding"


def _open_data(cfg: TrainConfig):
    from prefixcap.data.loader import CaptionDataset

    _check_data_dir(cfg)
    try:
        return CaptionDataset(cfg.data_dir, features=_features(cfg))
    except (FileNotFoundError, ValueError) as err:  # ValueError: a token mapper on a dataset without tokens
        raise TrainConfigError(f"--data_dir {cfg.data_dir}: {err}") from err


def train(cfg: TrainConfig, argv: list[str] | None = None) -> TrainResult | None:
    """Run training; returns what it did (None in the processes a multi-GPU relaunch started)."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    cpu, ngpu = select_devices(cfg.gpu_devices)
    if not cpu and ngpu > 1 and not _launched():
        code = _relaunch(argv if argv is not None else sys.argv[1:], ngpu)
        if code:
            raise SystemExit(code)
        return None
    _check_data_dir(cfg)
    _check_attention(cfg, cpu)
    from prefixcap.locking import output_lock

    # Only the main process locks: the other ranks of this run write nothing but DeepSpeed's
    # optimizer partitions, inside saves the main process leads (a refused main process fails the
    # whole launch). A second run's main process is refused while this one, or any of its forked
    # DataLoader workers, lives.
    main_process = int(os.environ.get("RANK", "0")) == 0
    lock = output_lock(cfg.output_dir, "prefixcap train") if main_process else contextlib.nullcontext()
    with lock:
        return _Trainer(cfg, cpu).run()


class _Trainer:
    """One training run: builds everything in __init__, trains in run()."""

    def __init__(self, cfg: TrainConfig, cpu: bool):
        import numpy as np
        import torch
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from prefixcap.checkpoint import (
            checkpoint_path,
            has_checkpoint,
            load_checkpoint,
        )
        from prefixcap.data.loader import (
            CaptionDataset,
            LengthGroupedBatchSampler,
            SequentialBatchSampler,
            make_loader,
            split_by_image,
        )

        self.cfg = cfg
        if cfg.val_fraction and cfg.val_data_dir:
            raise TrainConfigError("give either --val_fraction or --val_data_dir, not both")
        if not 0 <= cfg.val_fraction < 1:
            raise TrainConfigError(f"--val_fraction must be in [0, 1), got {cfg.val_fraction}")
        self.data = _open_data(cfg)
        manifest = self.data.manifest
        lengths = self.data.data.lengths()  # (N,) int32
        if len(lengths) == 0:
            raise TrainConfigError(f"--data_dir {cfg.data_dir}: the dataset has no captions")

        mixed = cfg.mixed_precision
        notices: list[str] = []
        if cpu:
            notices.append("no GPU found (or --gpu_devices cpu): training on the CPU in fp32")
            if mixed not in ("auto", "no"):
                notices.append(f"--mixed_precision {mixed} is ignored on the CPU: training in fp32")
            mixed = "no"
        elif mixed == "auto":
            mixed = "bf16" if torch.cuda.is_bf16_supported() else "no"
        plugin = None
        if cfg.use_deepspeed and cpu:
            notices.append("--use_deepspeed needs a GPU: training without DeepSpeed")
        elif cfg.use_deepspeed:
            try:
                import deepspeed  # noqa: F401
            except ImportError as err:
                raise TrainConfigError("--use_deepspeed: the deepspeed package is not installed "
                                       "(pip install 'prefixcap[deepspeed]')") from err
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin(zero_stage=cfg.deepspeed_stage,
                                     gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                     gradient_clipping=cfg.max_grad_norm or None)
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        if cfg.log_with:
            from accelerate.utils import is_tensorboard_available, is_wandb_available

            available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[cfg.log_with]()
            if not available:
                raise TrainConfigError(f"--log_with {cfg.log_with}: the {cfg.log_with} package is not installed "
                                       f"(pip install {cfg.log_with})")
        out = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=mixed, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            deepspeed_plugin=plugin, log_with=cfg.log_with,
            project_config=ProjectConfiguration(project_dir=str(out),
                                                logging_dir=cfg.logging_dir or str(out / "logs")),
            step_scheduler_with_optimizer=False)
        acc = self.accelerator
        for n in notices:
            acc.print(f"prefixcap train: {n}")
        self.is_deepspeed = plugin is not None
        self.rank, self.world = acc.process_index, acc.num_processes

        # Validation split (by image) and samplers.
        try:
            train_idx, val_idx = split_by_image(self.data.data, cfg.val_fraction, cfg.seed)
        except ValueError as err:  # e.g. a fraction that leaves no training image
            raise TrainConfigError(f"{err} (the dataset {cfg.data_dir} has {self.data.data.num_images} images)") \
                from err
        self.val_data = self.data
        if cfg.val_data_dir:
            try:
                self.val_data = CaptionDataset(cfg.val_data_dir, features=_features(cfg))
            except (FileNotFoundError, ValueError) as err:
                raise TrainConfigError(f"--val_data_dir {cfg.val_data_dir}: {err}") from err
            self._check_val_manifest(self.val_data.manifest, manifest)
            val_idx = np.arange(len(self.val_data), dtype=np.int64)
        self.val_idx = val_idx
        self.sampler = LengthGroupedBatchSampler(train_idx, lengths[train_idx], cfg.batch_size, seed=cfg.seed,
                                                 num_replicas=self.world, rank=self.rank,
                                                 group_by_length=cfg.group_by_length)
        pin = not cpu
        self.loader = make_loader(self.data, self.sampler, cfg.num_workers, pin, cfg.seed)
        self.val_loader = None
        if len(val_idx):
            val_lengths = (self.val_data.data.lengths() if cfg.val_data_dir else lengths)[val_idx]
            vs = SequentialBatchSampler(val_idx, val_lengths, cfg.batch_size, self.world, self.rank)
            self.val_loader = make_loader(self.val_data, vs, min(cfg.num_workers, 2), pin, cfg.seed)

        self._check_previous_run(out)

        # Resume point.
        self.run_config = {**{k: v for k, v in asdict(cfg).items() if k not in {"hf_kwargs", "resume"}},
                           "hf_kwargs": {k: v for k, v in cfg.hf_kwargs.items() if k != "token"},
                           "num_processes": self.world, "num_train_captions": len(train_idx)}
        self.resume_from = None
        if cfg.resume:
            path = checkpoint_path(out, cfg.output_filename_prefix, "latest") if cfg.resume == "latest" \
                else Path(cfg.resume)
            if has_checkpoint(path):
                self.resume_from = load_checkpoint(path)
            elif cfg.resume != "latest":
                raise TrainConfigError(f"--resume {cfg.resume}: not a training checkpoint folder")
            else:
                acc.print(f"prefixcap train: --resume: no checkpoint at {path} yet; starting from scratch")

        # Model (the mapper's initialisation draws from the seeded RNG, identically on every rank).
        torch.manual_seed(cfg.seed)
        config, lm, tokenizer = resolve_model(cfg, manifest, self.data.data.embedding_dim, int(lengths.max()))
        from prefixcap.model import CaptionModel

        if self.resume_from is not None:
            self._check_resume(self.resume_from.run_config, config)
        if self.resume_from is not None and not cfg.only_prefix:
            lm = None  # fine-tuned: the LM weights come from the checkpoint's lm/ folder
            from prefixcap.language_models import LanguageModelError

            try:
                model = CaptionModel.from_pretrained(self.resume_from.path, **cfg.hf_kwargs)
            except (LanguageModelError, OSError, ImportError) as err:
                raise TrainRuntimeError(f"--resume: cannot load the model of {self.resume_from.path}: "
                                        f"{_first_line(err)}") from err
            model.config.language_model = config.language_model
        else:
            model = CaptionModel(config, lm=lm, tokenizer=tokenizer)
            if self.resume_from is not None:  # frozen LM: only the mapper was trained
                from safetensors.torch import load_file

                from prefixcap.model import MAPPER_WEIGHTS

                model.mapper.load_state_dict(load_file(self.resume_from.path / MAPPER_WEIGHTS))
        del lm
        if cfg.gradient_checkpointing:
            try:
                model.enable_gradient_checkpointing()
            except ValueError as err:
                raise TrainConfigError(f"--gradient_checkpointing: {err}") from err
        model.card_info = _card_info(cfg, manifest, len(train_idx))
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.total_params = sum(p.numel() for p in model.parameters())
        fused = {"fused": True} if not cpu and not self.is_deepspeed else {}
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.micro_per_epoch = len(self.sampler)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.gradient_accumulation_steps)
        total = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        self.total_steps = total
        from transformers import get_linear_schedule_with_warmup

        warmup = math.ceil(cfg.warmup_ratio * total) if cfg.warmup_ratio is not None else cfg.warmup_steps
        self.warmup_steps = warmup
        if warmup >= total and cfg.lr > 0 and acc.is_main_process:
            # The seed's 5000 warm-up steps on a short run: the learning rate stays a small fraction
            # of --lr and the loss barely moves, with no other sign of why.
            peak = cfg.lr * total / warmup if warmup else cfg.lr
            print(f"prefixcap train: warning: warm-up ({warmup} steps) is not shorter than the run ({total} optimizer "
                  f"steps): the learning rate peaks at {peak:.2e}, not --lr {cfg.lr:g}; use --warmup_ratio 0.1 or "
                  "fewer --warmup_steps", file=sys.stderr)
        self.scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(total, 1))
        # The scheduler is stepped by hand once per optimizer step (not prepared: Accelerate would
        # step it once per process), so --warmup_steps counts optimizer steps as in the seed.
        self.model, self.optimizer = acc.prepare(model, optimizer)
        from prefixcap.checkpoint import TrainingState, restore_rng_states

        self.state = TrainingState()
        if self.resume_from is not None:
            self.state = self.resume_from.state
            payload = self.resume_from.payload
            if self.is_deepspeed and self.resume_from.deepspeed_dir.is_dir():
                acc.load_state(str(self.resume_from.deepspeed_dir))
            else:
                if "optimizer" in payload:
                    self.optimizer.optimizer.load_state_dict(payload["optimizer"])
                else:  # an epoch checkpoint: optimizer state is kept in {prefix}_latest.ckpt only
                    acc.print(f"prefixcap train: notice: {self.resume_from.path} holds no optimizer state (only "
                              f"{cfg.output_filename_prefix}_latest.ckpt does); continuing with fresh AdamW "
                              "moments, so the run will not match an uninterrupted one exactly")
            self.scheduler.load_state_dict(payload["scheduler"])
            if acc.is_main_process:
                restore_rng_states(payload["rng"])
        self.device = acc.device
        self.result = TrainResult(device=str(self.device), num_processes=self.world,
                                  resumed_from=str(self.resume_from.path) if self.resume_from else None)

    def _check_previous_run(self, out: Path) -> None:
        """Refuse to mix two runs' checkpoints in one folder: --resume continues, --overwrite_output_dir restarts."""
        from prefixcap.checkpoint import previous_run_files

        cfg, acc = self.cfg, self.accelerator
        found = previous_run_files(out, cfg.output_filename_prefix)
        if not found or cfg.resume:
            return
        if not cfg.overwrite_output_dir:
            names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise TrainConfigError(
                f"--output_dir {out} holds a previous run's checkpoints ({names}); continue it with --resume, "
                f"start afresh with --overwrite_output_dir (deletes them), or use another --output_dir or "
                "--output_filename_prefix")
        acc.wait_for_everyone()  # every rank has looked before the main process deletes
        if acc.is_main_process:
            import shutil

            for path in found:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            acc.print(f"prefixcap train: --overwrite_output_dir: deleted {len(found)} file(s) of the previous run "
                      f"in {out}")
        acc.wait_for_everyone()

    def _check_val_manifest(self, val: dict[str, Any], train: dict[str, Any]) -> None:
        for key in ("embedding_dim", "clip_model", "tokenizer_fingerprint", "lm_family"):
            if key in val and key in train and val[key] != train[key]:
                raise TrainConfigError(f"--val_data_dir {self.cfg.val_data_dir}: its {key} ({val[key]}) differs "
                                       f"from --data_dir {self.cfg.data_dir}'s ({train[key]})")

    def _check_resume(self, saved: dict[str, Any], config) -> None:
        now = self.run_config
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in _RESUME_KEYS
                 if k in saved and saved.get(k) != now.get(k)]
        saved_model = json.loads((self.resume_from.path / "config.json").read_text())
        new_model = config.to_dict()
        diffs += [f"{k}: checkpoint {saved_model.get(k)!r}, now {new_model.get(k)!r}" for k in _MODEL_KEYS
                  if saved_model.get(k) != new_model.get(k)]
        if diffs:
            raise TrainConfigError(
                f"--resume: {self.resume_from.path} was written by a run with other settings ("
                + "; ".join(diffs) + "); resume with the same settings or use another --output_dir")

    # --- helpers ---------------------------------------------------------------------------
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _save(self, tag: str | int) -> None:
        from prefixcap.checkpoint import checkpoint_path, save_checkpoint

        path = checkpoint_path(self.cfg.output_dir, self.cfg.output_filename_prefix, tag)
        model = self._unwrapped()
        self._refresh_card(model)
        # Optimizer state (2x the trained weights under AdamW) only in _latest, the resume point; epoch
        # and final checkpoints are models plus the small scheduler/RNG state.
        save_checkpoint(path, model, self.optimizer.optimizer, self.scheduler, self.state,
                        self.run_config, accelerator=self.accelerator, with_optimizer=tag == "latest",
                        merge_lora=self.cfg.merge_lora and tag == "final")
        if str(path) not in self.result.checkpoints:
            self.result.checkpoints.append(str(path))

    def _refresh_card(self, model) -> None:
        """The run and its last validation, for the model card every checkpoint carries."""
        cfg, r = self.cfg, self.result
        if r.val_losses:
            model.card_info["evaluation"] = {"validation_loss": r.val_losses[-1]["loss"],
                                             "step": r.val_losses[-1]["step"],
                                             **({"CIDEr": r.cider[-1]["cider"]} if r.cider else {})}
        model.card_info["training"] = {"epochs": self.state.epoch, "optimizer_steps": self.state.global_step,
                                       "samples_seen": self.state.samples_seen, "lr": cfg.lr,
                                       "batch_size": cfg.batch_size * self.world * cfg.gradient_accumulation_steps,
                                       "gradient_checkpointing": cfg.gradient_checkpointing}

    def _prune_epoch_checkpoints(self) -> None:
        """--save_total_limit N: delete all but the N newest {prefix}_{epoch}.ckpt (main process)."""
        limit = self.cfg.save_total_limit
        if not limit or not self.accelerator.is_main_process:
            return
        import shutil

        from prefixcap.checkpoint import epoch_checkpoints

        for _, path in epoch_checkpoints(self.cfg.output_dir, self.cfg.output_filename_prefix)[:-limit]:
            shutil.rmtree(path, ignore_errors=True)
            if str(path) in self.result.checkpoints:
                self.result.checkpoints.remove(str(path))

    def _to_device(self, batch):
        return [t.to(self.device, non_blocking=True) for t in batch]

    def validate(self) -> float | None:
        """Token-weighted mean caption loss over the validation set, all processes together."""
        import torch

        if self.val_loader is None:
            return None
        model = self.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        with torch.no_grad():
            for batch in self.val_loader:
                emb, tokens, mask = self._to_device(batch)
                loss = model(emb, tokens, mask)
                n = mask.sum()
                totals += torch.stack([loss.double() * n, n.double()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        model.train(was_training)
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    def cider(self) -> float | None:
        """CIDEr of greedy captions for a few validation images (main process); None if unavailable."""
        n = self.cfg.eval_cider_images
        if not n or self.val_loader is None or not self.accelerator.is_main_process:
            return None
        try:
            import numpy as np

            from prefixcap.caption import Captioner
            from prefixcap.evaluate import evaluate_predictions
            from prefixcap.pipeline import Item, PipelineOptions, caption_items

            data = self.val_data.data
            images = data.caption_image_indices()[self.val_idx]
            refs: dict[str, list[str]] = {}
            emb: dict[str, np.ndarray] = {}
            for ci, img in zip(self.val_idx.tolist(), images.tolist()):
                key = f"{img}"
                if key not in refs and len(refs) >= n:
                    continue
                sample = data[ci]
                refs.setdefault(key, []).append(sample.caption)
                emb[key] = sample.patch_tokens if _features(self.cfg) == "patch_tokens" else sample.embedding
            model = self._unwrapped()
            was_training = model.training
            captioner = Captioner(model)
            keys = list(refs)
            items = (Item(k, embedding=emb[k]) for k in keys)
            results = list(caption_items(captioner, items, PipelineOptions(num_workers=1)))  # embeddings: no decoding
            failed = next((r for r in results if r.error is not None), None)
            if failed is not None:
                raise RuntimeError(f"validation image {failed.key}: {failed.error}")
            texts = [r.caption for r in results]
            model.train(was_training)
            result = evaluate_predictions(dict(zip(keys, texts)), refs, metrics=["cider"], progress=False)
            return float(result["metrics"]["CIDEr"])
        except Exception as err:  # noqa: BLE001 - an optional metric never stops training
            if not getattr(self, "_cider_notice", False):
                self.accelerator.print(f"prefixcap train: notice: CIDEr during training unavailable ({err}); "
                                       "validation loss only")
                self._cider_notice = True
            return None

    def _evaluate(self, tracker_log) -> None:
        val = self.validate()
        if val is not None:
            self.result.val_losses.append({"step": self.state.global_step, "loss": val})
            tracker_log({"val/loss": val})
            self.accelerator.print(f"prefixcap train: step {self.state.global_step}: validation loss {val:.4f}")
        cider = self.cider()
        if cider is not None:
            self.result.cider.append({"step": self.state.global_step, "cider": cider})
            tracker_log({"val/cider": cider})
            self.accelerator.print(f"prefixcap train: step {self.state.global_step}: CIDEr {cider:.3f}")

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> TrainResult:
        import torch
        from tqdm.auto import tqdm

        cfg, acc, state = self.cfg, self.accelerator, self.state
        gas = cfg.gradient_accumulation_steps
        refresh = math.gcd(10, cfg.log_every_steps)  # progress-bar / tracker update period, in steps
        if cfg.log_with:
            acc.init_trackers(cfg.output_filename_prefix, config={
                k: v for k, v in self.run_config.items() if isinstance(v, (int, float, str, bool))})

        def tracker_log(values: dict[str, float]) -> None:
            if cfg.log_with:
                acc.log(values, step=state.global_step)

        self._announce()
        done = (cfg.max_steps and state.global_step >= cfg.max_steps) or state.epoch >= cfg.epochs
        if done:
            acc.print(f"prefixcap train: {self.result.resumed_from} is already at the end of training "
                      f"(epoch {state.epoch}, step {state.global_step}); nothing to do")
        self.model.train()
        started = time.perf_counter()
        samples_this_run = 0
        stop = bool(done)
        while not stop and state.epoch < cfg.epochs:
            epoch, start = state.epoch, state.batch_in_epoch
            self.sampler.set_epoch(epoch, start)
            bar = tqdm(total=self.micro_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", dynamic_ncols=True, disable=not acc.is_local_main_process)
            loss_sum, loss_n, epoch_sum, epoch_n = torch.zeros((), device=self.device), 0, 0.0, 0
            t_epoch, samples_epoch = time.perf_counter(), 0
            for i, batch in enumerate(self.loader, start=start):
                group_start = i - (i % gas)
                group_size = min(gas, self.micro_per_epoch - group_start)
                if i == group_start:
                    # Dropout randomness is a function of (seed, rank, step): a resumed run
                    # draws exactly what the uninterrupted run drew, on every process.
                    torch.manual_seed(_group_seed(cfg.seed, self.rank, state.global_step))
                boundary = i + 1 == group_start + group_size
                acc.sync_gradients = boundary
                emb, tokens, mask = self._to_device(batch)
                # DeepSpeed keeps partitioned gradients itself (no_sync is incompatible with ZeRO-2).
                quiet = not boundary and not self.is_deepspeed
                ctx = acc.no_sync(self.model) if quiet else contextlib.nullcontext()
                with ctx:
                    loss = self.model(emb, tokens, mask)
                    # accelerate divides by gas; a short last group of the epoch is rescaled.
                    acc.backward(loss * (gas / group_size))
                if boundary:
                    if cfg.max_grad_norm and not self.is_deepspeed:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    state.global_step += 1
                n = emb.shape[0] * self.world
                state.samples_seen += n
                samples_this_run += n
                samples_epoch += n
                state.batch_in_epoch = i + 1
                loss_sum += loss.detach()
                loss_n += 1
                bar.update(1)
                if boundary and (state.global_step % refresh == 0 or i + 1 == self.micro_per_epoch):
                    mean = float(loss_sum) / loss_n  # one device sync per few steps, not per step
                    epoch_sum, epoch_n = epoch_sum + mean * loss_n, epoch_n + loss_n
                    lr = self.scheduler.get_last_lr()[0]
                    rate = samples_epoch / max(time.perf_counter() - t_epoch, 1e-9)
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}", refresh=False)
                    if state.global_step % cfg.log_every_steps == 0:
                        tracker_log({"train/loss": mean, "train/lr": lr, "train/samples_per_s": rate})
                    loss_sum.zero_()
                    loss_n = 0
                if boundary and cfg.save_every_steps and state.global_step % cfg.save_every_steps == 0:
                    self._save("latest")
                if boundary and cfg.eval_every_steps and state.global_step % cfg.eval_every_steps == 0:
                    self._evaluate(tracker_log)
                if boundary and cfg.max_steps and state.global_step >= cfg.max_steps:
                    stop = True
                    break
            bar.close()
            if loss_n:
                epoch_sum, epoch_n = epoch_sum + float(loss_sum), epoch_n + loss_n
            if epoch_n:
                self.result.epoch_train_losses.append(epoch_sum / epoch_n)
            if stop and state.batch_in_epoch < self.micro_per_epoch:
                self._save("latest")
                break
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            self._evaluate(tracker_log)
            self._save("latest")
            if cfg.save_every_epochs and state.epoch % cfg.save_every_epochs == 0:
                self._save(epoch)  # named 0-based as the seed does: demo_model_0.ckpt after the first epoch
                self._prune_epoch_checkpoints()
            if cfg.max_steps and state.global_step >= cfg.max_steps:
                break
        elapsed = time.perf_counter() - started
        if not done:
            self._save("final")
        r = self.result
        r.epochs_completed, r.global_step, r.samples_seen = state.epoch, state.global_step, state.samples_seen
        r.train_seconds = elapsed
        r.samples_per_second = samples_this_run / elapsed if elapsed > 0 else 0.0
        if cfg.log_with:
            acc.end_training()
        if acc.is_main_process:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            summary = Path(cfg.output_dir) / f"{cfg.output_filename_prefix}_summary.json"
            summary.write_text(json.dumps(asdict(r), indent=2) + "\n")
            self._report(r)
        acc.wait_for_everyone()
        if cfg.push_to_hub and acc.is_main_process:
            self._push()
        return r

    def _push(self) -> None:
        """--push_to_hub: upload the final model (training state excluded) with the standard client."""
        from prefixcap.checkpoint import checkpoint_path
        from prefixcap.hub import upload_artifact

        final = checkpoint_path(self.cfg.output_dir, self.cfg.output_filename_prefix, "final")
        try:
            upload_artifact(final, self.cfg.push_to_hub, private=self.cfg.hub_private,
                            token=self.cfg.hf_kwargs.get("token"))
        except Exception as err:  # noqa: BLE001 - network/auth errors: one line, the model stays on disk
            raise TrainRuntimeError(f"--push_to_hub {self.cfg.push_to_hub}: upload failed ({_first_line(err)}); "
                                    f"the model is saved at {final}; retry with prefixcap push {final} "
                                    f"{self.cfg.push_to_hub}") from err
        print(f"prefixcap train: pushed {final} to the Hub repo {self.cfg.push_to_hub}", flush=True)

    def _announce(self) -> None:
        cfg, c = self.cfg, self._unwrapped().config
        where = f"resuming {self.result.resumed_from} at epoch {self.state.epoch + 1}, step {self.state.global_step}" \
            if self.resume_from else "starting"
        self.accelerator.print(
            f"prefixcap train: {where}; {c.language_model} ({c.lm_family}, "
            f"{c.lm_mode if c.lora is None else f'LoRA rank {c.lora.rank}'}) + {c.mapping.mapping_type} mapper, "
            f"K={c.prefix_length}; "
            f"{self.trainable:,} of {self.total_params:,} parameters trained; {len(self.sampler.indices):,} "
            f"training captions, {len(self.val_idx):,} validation; {self.world} process(es) on {self.device}, "
            f"batch {cfg.batch_size}x{self.world}x{cfg.gradient_accumulation_steps}, "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
            f"precision {self.accelerator.mixed_precision}")

    def _report(self, r: TrainResult) -> None:
        lines = [(f"prefixcap train: done: {r.epochs_completed} epoch(s), {r.global_step} steps, "
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


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a refused flag or configuration, 1 a failure while running, 130 Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after tokenizers ran
    cfg = parse_config(argv)
    from prefixcap.locking import OutputLockedError

    try:
        train(cfg, argv)
    except TrainConfigError as err:
        print(f"prefixcap train: error: {err}", file=sys.stderr)
        return 2
    except (TrainRuntimeError, OutputLockedError) as err:
        print(f"prefixcap train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\n{_interrupted_hint(cfg)}", file=sys.stderr)
        return 130
    return 0


def _interrupted_hint(cfg: TrainConfig) -> str:
    from prefixcap.checkpoint import checkpoint_path, has_checkpoint, load_checkpoint

    latest = checkpoint_path(cfg.output_dir, cfg.output_filename_prefix, "latest")
    if not has_checkpoint(latest):
        return "prefixcap train: interrupted before the first checkpoint; rerun the same command to start again"
    try:
        step = f" (step {load_checkpoint(latest).state.global_step})"
    except Exception:  # noqa: BLE001 - the hint must not fail; the step is a nicety
        step = ""
    return (f"prefixcap train: interrupted; {latest}{step} is kept: rerun the same command with --resume "
            "to continue from it")


if __name__ == "__main__":
    sys.exit(main())
