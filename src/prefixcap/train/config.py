"""A training run's settings (`TrainConfig`), what it reports (`TrainResult`) and the errors it raises.

`prefixcap train`'s flags map one to one onto `TrainConfig`'s fields; `train(TrainConfig(...))`
(prefixcap.train.run) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefixcap.errors import PrefixcapError, UsageError

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

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb")


def default_num_workers(most: int = 4) -> int:
    """DataLoader workers by default: `most`, but no more than the CPUs this process may use (torch
    warns about more workers than that)."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(most, cpus))


class TrainConfigError(UsageError):
    """A refused configuration: the message names the flag and what was expected (exit status 2)."""


class TrainRuntimeError(PrefixcapError, RuntimeError):
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
    # CapDec: Gaussian noise of this variance on the normalised embeddings, training only (model.noise).
    # None: 0.016 on a text-only dataset (preprocess --text_only), else 0.
    noise_variance: float | None = None
    datastore: str | None = None  # retrieval-augmented training: prompts from this datastore (prefixcap.retrieval)
    retrieval_k: int = 4  # captions per prompt (SmallCap's k)
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
    num_workers: int = field(default_factory=default_num_workers)  # 4, fewer on a smaller machine
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


def mapper_features(cfg: TrainConfig) -> str:
    """What the mapper reads from the shards: the pooled embedding or the patch tokens."""
    from prefixcap.model.mapping import TOKEN_MAPPERS

    return "patch_tokens" if cfg.mapping_type in TOKEN_MAPPERS else "embedding"
