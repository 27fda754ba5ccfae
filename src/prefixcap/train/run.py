"""The train stage's library: fit the mapping network (and optionally the LM) on a preprocessed dataset.

`train(TrainConfig(...))` runs one training run and returns a `TrainResult`; `prefixcap train`
(prefixcap.train.cli) is its command line. One code path (Hugging Face Accelerate) runs on the CPU,
one GPU, several GPUs or nodes (`accelerate launch` / `torchrun`) and under DeepSpeed ZeRO.
Progress lines go through the accelerator's main-process print; notices are logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefixcap.devices import relaunch, select_devices, under_launcher
from prefixcap.errors import PrefixcapError, UsageError, first_line

if TYPE_CHECKING:  # the data stack is imported only when a run starts
    from prefixcap.data.shards import Manifest

logger = logging.getLogger(__name__)

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


# --- the run ---------------------------------------------------------------------------------
_RESUME_KEYS = ("batch_size", "seed", "gradient_accumulation_steps", "group_by_length", "num_processes",
                "num_train_captions", "val_fraction")
_MODEL_KEYS = ("lm_family", "normalize_prefix", "only_prefix", "mapping", "lora")


def _group_seed(seed: int, rank: int, step: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


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


def _check_validation_flags(cfg: TrainConfig) -> None:
    if cfg.val_fraction and cfg.val_data_dir:
        raise TrainConfigError("give either --val_fraction or --val_data_dir, not both")
    if not 0 <= cfg.val_fraction < 1:
        raise TrainConfigError(f"--val_fraction must be in [0, 1), got {cfg.val_fraction}")


def _features(cfg: TrainConfig) -> str:
    """What the mapper reads from the shards: the pooled embedding or the patch tokens."""
    from prefixcap.model.mapping import TOKEN_MAPPERS

    return "patch_tokens" if cfg.mapping_type in TOKEN_MAPPERS else "embedding"


def _open_data(cfg: TrainConfig):
    from prefixcap.data.loader import CaptionDataset

    _check_data_dir(cfg)
    try:
        return CaptionDataset(cfg.data_dir, features=_features(cfg))
    except (FileNotFoundError, ValueError) as err:  # ValueError: a token mapper on a dataset without tokens
        raise TrainConfigError(f"--data_dir {cfg.data_dir}: {err}") from err


def train(cfg: TrainConfig, argv: list[str] | None = None) -> TrainResult | None:
    """Run training; returns what it did (None in the processes a multi-GPU relaunch started).

    argv: the command line to rerun under torchrun when several GPUs are asked for without a launcher.
    """
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    cpu, ngpu = select_devices(cfg.gpu_devices)
    if not cpu and ngpu > 1 and not under_launcher():
        code = relaunch(argv if argv is not None else sys.argv[1:], ngpu)
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


@dataclass
class _EpochMeter:
    """Running loss and throughput of the epoch in progress (the progress bar's and the result's numbers)."""

    loss_sum: Any  # a 0-d tensor on the device: summed without a device sync per step
    started: float
    loss_n: int = 0
    epoch_sum: float = 0.0
    epoch_n: int = 0
    samples: int = 0


class _Trainer:
    """One training run: builds everything in __init__, trains in run().

    The build steps run in a fixed order that bit-exact resume depends on: the RNG is seeded just
    before the model is built (the mapper's initialisation draws from it), and the saved RNG states
    are restored only after everything that draws at build time.
    """

    def __init__(self, cfg: TrainConfig, cpu: bool):
        self.cfg = cfg
        _check_validation_flags(cfg)
        self.data = _open_data(cfg)
        manifest = self.data.manifest
        lengths = self.data.data.lengths()  # (N,) int32
        if len(lengths) == 0:
            raise TrainConfigError(f"--data_dir {cfg.data_dir}: the dataset has no captions")
        self._build_accelerator(cpu)
        train_idx = self._build_loaders(cpu, lengths, manifest)
        self._check_previous_run(Path(cfg.output_dir))
        self._find_resume_point(len(train_idx))
        model = self._build_model(manifest, lengths, len(train_idx))
        self._build_optimizer_and_schedule(model, cpu)
        self._restore_state()
        self.device = self.accelerator.device
        self.result = TrainResult(device=str(self.device), num_processes=self.world,
                                  resumed_from=str(self.resume_from.path) if self.resume_from else None)

    # --- building (in __init__'s order) ----------------------------------------------------
    def _build_accelerator(self, cpu: bool) -> None:
        """Precision, DeepSpeed and tracker choices -> self.accelerator (with the notices they need)."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.cfg
        mixed, notices = self._precision(cpu)
        plugin = self._deepspeed_plugin(cpu, notices)
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
        for n in notices:
            self.accelerator.print(f"prefixcap train: {n}")
        self.is_deepspeed = plugin is not None
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes

    def _precision(self, cpu: bool) -> tuple[str, list[str]]:
        """--mixed_precision -> Accelerate's setting (always fp32 on the CPU), with notices to print."""
        import torch

        mixed = self.cfg.mixed_precision
        notices: list[str] = []
        if cpu:
            notices.append("no GPU found (or --gpu_devices cpu): training on the CPU in fp32")
            if mixed not in ("auto", "no"):
                notices.append(f"--mixed_precision {mixed} is ignored on the CPU: training in fp32")
            mixed = "no"
        elif mixed == "auto":
            mixed = "bf16" if torch.cuda.is_bf16_supported() else "no"
        return mixed, notices

    def _deepspeed_plugin(self, cpu: bool, notices: list[str]):
        """--use_deepspeed -> a DeepSpeedPlugin (None without it, or on the CPU with a notice)."""
        cfg = self.cfg
        if cfg.use_deepspeed and cpu:
            notices.append("--use_deepspeed needs a GPU: training without DeepSpeed")
        if not cfg.use_deepspeed or cpu:
            return None
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
        return plugin

    def _build_loaders(self, cpu: bool, lengths, manifest: Manifest):
        """Validation split (by image), samplers and loaders; returns the training caption indices."""
        import numpy as np

        from prefixcap.data.loader import (
            CaptionDataset,
            LengthGroupedBatchSampler,
            SequentialBatchSampler,
            make_loader,
            split_by_image,
        )

        cfg = self.cfg
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
        return train_idx

    def _find_resume_point(self, num_train_captions: int) -> None:
        """self.run_config (what a resume must match) and self.resume_from (the checkpoint, or None)."""
        from prefixcap.train.checkpoint import checkpoint_path, has_checkpoint, load_checkpoint

        cfg = self.cfg
        self.run_config = {**{k: v for k, v in asdict(cfg).items() if k not in {"hf_kwargs", "resume"}},
                           "hf_kwargs": {k: v for k, v in cfg.hf_kwargs.items() if k != "token"},
                           "num_processes": self.world, "num_train_captions": num_train_captions}
        self.resume_from = None
        if cfg.resume:
            path = checkpoint_path(cfg.output_dir, cfg.output_filename_prefix, "latest") if cfg.resume == "latest" \
                else Path(cfg.resume)
            if has_checkpoint(path):
                self.resume_from = load_checkpoint(path)
            elif cfg.resume != "latest":
                raise TrainConfigError(f"--resume {cfg.resume}: not a training checkpoint folder")
            else:
                self.accelerator.print(f"prefixcap train: --resume: no checkpoint at {path} yet; starting from scratch")

    def _build_model(self, manifest: Manifest, lengths, num_train_captions: int):
        """The CaptionModel, new or from the resume checkpoint (seeded: identical on every rank)."""
        import torch

        from prefixcap.train.setup import card_info, resolve_model

        cfg = self.cfg
        # The mapper's initialisation draws from the seeded RNG, identically on every rank.
        torch.manual_seed(cfg.seed)
        config, lm, tokenizer = resolve_model(cfg, manifest, self.data.data.embedding_dim, int(lengths.max()))
        if self.resume_from is not None:
            self._check_resume(self.resume_from.run_config, config)
        if self.resume_from is not None and not cfg.only_prefix:
            del lm  # fine-tuned: the LM weights come from the checkpoint's lm/ folder
            model = self._load_resumed_model(config)
        else:
            model = self._new_model(config, lm, tokenizer)
            del lm
        if cfg.gradient_checkpointing:
            try:
                model.enable_gradient_checkpointing()
            except ValueError as err:
                raise TrainConfigError(f"--gradient_checkpointing: {err}") from err
        model.card_info = card_info(cfg, manifest, num_train_captions)
        return model

    def _load_resumed_model(self, config):
        from prefixcap.model.language_models import LanguageModelError
        from prefixcap.model.captioning import CaptionModel

        try:
            model = CaptionModel.from_pretrained(self.resume_from.path, **self.cfg.hf_kwargs)
        except (LanguageModelError, OSError, ImportError) as err:
            raise TrainRuntimeError(f"--resume: cannot load the model of {self.resume_from.path}: "
                                    f"{first_line(err)}") from err
        model.config.language_model = config.language_model
        return model

    def _new_model(self, config, lm, tokenizer):
        from prefixcap.model.captioning import CaptionModel

        model = CaptionModel(config, lm=lm, tokenizer=tokenizer)
        if self.resume_from is not None:  # frozen LM: only the mapper was trained
            from safetensors.torch import load_file

            from prefixcap.model.captioning import MAPPER_WEIGHTS

            model.mapper.load_state_dict(load_file(self.resume_from.path / MAPPER_WEIGHTS))
        return model

    def _build_optimizer_and_schedule(self, model, cpu: bool) -> None:
        """AdamW over the trained parameters, the warm-up/decay schedule, and Accelerate's wrapping."""
        import torch
        from transformers import get_linear_schedule_with_warmup

        cfg, acc = self.cfg, self.accelerator
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
        warmup = math.ceil(cfg.warmup_ratio * total) if cfg.warmup_ratio is not None else cfg.warmup_steps
        self.warmup_steps = warmup
        if warmup >= total and cfg.lr > 0 and acc.is_main_process:
            # The seed's 5000 warm-up steps on a short run: the learning rate stays a small fraction
            # of --lr and the loss barely moves, with no other sign of why.
            peak = cfg.lr * total / warmup if warmup else cfg.lr
            logger.warning(f"prefixcap train: warning: warm-up ({warmup} steps) is not shorter than the run ({total} "
                           f"optimizer steps): the learning rate peaks at {peak:.2e}, not --lr {cfg.lr:g}; use "
                           "--warmup_ratio 0.1 or fewer --warmup_steps")
        self.scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(total, 1))
        # The scheduler is stepped by hand once per optimizer step (not prepared: Accelerate would
        # step it once per process), so --warmup_steps counts optimizer steps as in the seed.
        self.model, self.optimizer = acc.prepare(model, optimizer)

    def _restore_state(self) -> None:
        """self.state; on resume: optimizer, scheduler and (main process) RNG states from the checkpoint."""
        from prefixcap.train.checkpoint import TrainingState, restore_rng_states

        cfg, acc = self.cfg, self.accelerator
        self.state = TrainingState()
        if self.resume_from is None:
            return
        self.state = self.resume_from.state
        payload = self.resume_from.payload
        if self.is_deepspeed and self.resume_from.deepspeed_dir.is_dir():
            acc.load_state(str(self.resume_from.deepspeed_dir))
        elif "optimizer" in payload:
            self.optimizer.optimizer.load_state_dict(payload["optimizer"])
        else:  # an epoch checkpoint: optimizer state is kept in {prefix}_latest.ckpt only
            acc.print(f"prefixcap train: notice: {self.resume_from.path} holds no optimizer state (only "
                      f"{cfg.output_filename_prefix}_latest.ckpt does); continuing with fresh AdamW "
                      "moments, so the run will not match an uninterrupted one exactly")
        self.scheduler.load_state_dict(payload["scheduler"])
        self._lr_from_this_schedule()
        if acc.is_main_process:
            restore_rng_states(payload["rng"])

    def _lr_from_this_schedule(self) -> None:
        """Set the LR this run's schedule gives at the restored step.

        The restored optimizer holds the LR of the run that saved it; a resumed run with a larger --epochs
        or --max_steps has a longer schedule, and its next step would otherwise use the old one's last LR
        (0 once that schedule ended). The same expression as LambdaLR's, so an unchanged schedule gives
        the very same value and resume stays bit-identical.
        """
        sched = self.scheduler
        lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs  # what get_last_lr() reports (progress bar, tracker)

    # --- checks ---------------------------------------------------------------------------
    def _check_previous_run(self, out: Path) -> None:
        """Refuse to mix two runs' checkpoints in one folder: --resume continues, --overwrite_output_dir restarts."""
        from prefixcap.train.checkpoint import previous_run_files

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

    def _check_val_manifest(self, val: Manifest, train: Manifest) -> None:
        for key in ("embedding_dim", "clip_model", "tokenizer_fingerprint", "lm_family"):
            mine, theirs = getattr(val, key), getattr(train, key)
            if mine is not None and theirs is not None and mine != theirs:
                raise TrainConfigError(f"--val_data_dir {self.cfg.val_data_dir}: its {key} ({mine}) differs "
                                       f"from --data_dir {self.cfg.data_dir}'s ({theirs})")

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
        from prefixcap.train.checkpoint import checkpoint_path, save_checkpoint

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

        from prefixcap.train.checkpoint import epoch_checkpoints

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

            from prefixcap.caption.captioner import Captioner
            from prefixcap.evaluate.run import evaluate_predictions
            from prefixcap.caption.pipeline import Item, PipelineOptions, caption_items

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
            try:  # Captioner puts the model in eval mode; training must get its dropout back even on failure
                captioner = Captioner(model)
                keys = list(refs)
                items = (Item(k, embedding=emb[k]) for k in keys)
                results = list(caption_items(captioner, items, PipelineOptions(num_workers=1)))  # no decoding
            finally:
                model.train(was_training)
            failed = next((r for r in results if r.error is not None), None)
            if failed is not None:
                raise RuntimeError(f"validation image {failed.key}: {failed.error}")
            texts = [r.caption for r in results]
            result = evaluate_predictions(dict(zip(keys, texts)), refs, metrics=["cider"], progress=False)
            return float(result["metrics"]["CIDEr"])
        except Exception as err:  # noqa: BLE001 - an optional metric never stops training
            if not getattr(self, "_cider_notice", False):
                self.accelerator.print(f"prefixcap train: notice: CIDEr during training unavailable ({err}); "
                                       "validation loss only")
                self._cider_notice = True
            return None

    def _evaluate(self) -> None:
        val = self.validate()
        if val is not None:
            self.result.val_losses.append({"step": self.state.global_step, "loss": val})
            self._tracker_log({"val/loss": val})
            self.accelerator.print(f"prefixcap train: step {self.state.global_step}: validation loss {val:.4f}")
        cider = self.cider()
        if cider is not None:
            self.result.cider.append({"step": self.state.global_step, "cider": cider})
            self._tracker_log({"val/cider": cider})
            self.accelerator.print(f"prefixcap train: step {self.state.global_step}: CIDEr {cider:.3f}")

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        self.refresh = math.gcd(10, cfg.log_every_steps)  # progress-bar / tracker update period, in steps
        if cfg.log_with:
            acc.init_trackers(cfg.output_filename_prefix, config={
                k: v for k, v in self.run_config.items() if isinstance(v, (int, float, str, bool))})
        self._announce()
        done = bool((cfg.max_steps and state.global_step >= cfg.max_steps) or state.epoch >= cfg.epochs)
        if done:
            acc.print(f"prefixcap train: {self.result.resumed_from} is already at the end of training "
                      f"(epoch {state.epoch}, step {state.global_step}); nothing to do")
        self.model.train()
        started = time.perf_counter()
        self.samples_this_run = 0
        stop = done
        while not stop and state.epoch < cfg.epochs:
            stop = self._run_epoch()
        self._finish(time.perf_counter() - started, done)
        return self.result

    def _tracker_log(self, values: dict[str, float]) -> None:
        if self.cfg.log_with:
            self.accelerator.log(values, step=self.state.global_step)

    def _run_epoch(self) -> bool:
        """Train from the resume point of the current epoch to its end; True when the run stops here."""
        import torch
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        epoch, start = state.epoch, state.batch_in_epoch
        self.sampler.set_epoch(epoch, start)
        bar = tqdm(total=self.micro_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", dynamic_ncols=True, disable=not self.accelerator.is_local_main_process)
        meter = _EpochMeter(loss_sum=torch.zeros((), device=self.device), started=time.perf_counter())
        stop = False
        for i, batch in enumerate(self.loader, start=start):
            boundary = self._train_micro_batch(i, batch, meter)
            bar.update(1)
            if boundary:
                stop = self._after_optimizer_step(i, meter, bar)
            if stop:
                break
        bar.close()
        return self._end_epoch(epoch, meter, stop)

    def _train_micro_batch(self, i: int, batch, meter: _EpochMeter) -> bool:
        """Forward and backward of micro-batch i of the epoch (and the optimizer step at a group's end).

        Returns whether it ended a gradient-accumulation group (an optimizer step was taken).
        """
        import torch

        cfg, acc, state = self.cfg, self.accelerator, self.state
        gas = cfg.gradient_accumulation_steps
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
            self._optimizer_step()
        n = emb.shape[0] * self.world
        state.samples_seen += n
        self.samples_this_run += n
        meter.samples += n
        state.batch_in_epoch = i + 1
        meter.loss_sum += loss.detach()
        meter.loss_n += 1
        return boundary

    def _optimizer_step(self) -> None:
        if self.cfg.max_grad_norm and not self.is_deepspeed:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1

    def _after_optimizer_step(self, i: int, meter: _EpochMeter, bar) -> bool:
        """Progress, periodic saves and validation after an optimizer step; True when --max_steps is reached."""
        cfg, step = self.cfg, self.state.global_step
        if step % self.refresh == 0 or i + 1 == self.micro_per_epoch:
            self._show_progress(meter, bar)
        if cfg.save_every_steps and step % cfg.save_every_steps == 0:
            self._save("latest")
        if cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
            self._evaluate()
        return bool(cfg.max_steps and step >= cfg.max_steps)

    def _show_progress(self, meter: _EpochMeter, bar) -> None:
        mean = float(meter.loss_sum) / meter.loss_n  # one device sync per few steps, not per step
        meter.epoch_sum, meter.epoch_n = meter.epoch_sum + mean * meter.loss_n, meter.epoch_n + meter.loss_n
        lr = self.scheduler.get_last_lr()[0]
        rate = meter.samples / max(time.perf_counter() - meter.started, 1e-9)
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}", refresh=False)
        if self.state.global_step % self.cfg.log_every_steps == 0:
            self._tracker_log({"train/loss": mean, "train/lr": lr, "train/samples_per_s": rate})
        meter.loss_sum.zero_()
        meter.loss_n = 0

    def _end_epoch(self, epoch: int, meter: _EpochMeter, stop: bool) -> bool:
        """The epoch's mean loss, then (unless stopped mid-epoch) validation and saves; True when the run stops."""
        cfg, state = self.cfg, self.state
        if meter.loss_n:
            meter.epoch_sum, meter.epoch_n = meter.epoch_sum + float(meter.loss_sum), meter.epoch_n + meter.loss_n
        if meter.epoch_n:
            self.result.epoch_train_losses.append(meter.epoch_sum / meter.epoch_n)
        if stop and state.batch_in_epoch < self.micro_per_epoch:
            self._save("latest")
            return True
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        self._evaluate()
        self._save("latest")
        if cfg.save_every_epochs and state.epoch % cfg.save_every_epochs == 0:
            self._save(epoch)  # named 0-based as the seed does: demo_model_0.ckpt after the first epoch
            self._prune_epoch_checkpoints()
        return bool(cfg.max_steps and state.global_step >= cfg.max_steps)

    def _finish(self, elapsed: float, done: bool) -> None:
        """The final model, the result and {prefix}_summary.json; then --push_to_hub."""
        cfg, acc, state, r = self.cfg, self.accelerator, self.state, self.result
        if not done:
            self._save("final")
        r.epochs_completed, r.global_step, r.samples_seen = state.epoch, state.global_step, state.samples_seen
        r.train_seconds = elapsed
        r.samples_per_second = self.samples_this_run / elapsed if elapsed > 0 else 0.0
        if cfg.log_with:
            acc.end_training()
        if acc.is_main_process:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            summary = Path(cfg.output_dir) / f"{cfg.output_filename_prefix}_summary.json"
            summary.write_text(json.dumps(asdict(r), indent=2) + "\n")
        acc.wait_for_everyone()
        if cfg.push_to_hub and acc.is_main_process:
            self._push()

    def _push(self) -> None:
        """--push_to_hub: upload the final model (training state excluded) with the standard client."""
        from prefixcap.train.checkpoint import checkpoint_path
        from prefixcap.model.hub import upload_artifact

        final = checkpoint_path(self.cfg.output_dir, self.cfg.output_filename_prefix, "final")
        try:
            upload_artifact(final, self.cfg.push_to_hub, private=self.cfg.hub_private,
                            token=self.cfg.hf_kwargs.get("token"))
        except Exception as err:  # noqa: BLE001 - network/auth errors: one line, the model stays on disk
            raise TrainRuntimeError(f"--push_to_hub {self.cfg.push_to_hub}: upload failed ({first_line(err)}); "
                                    f"the model is saved at {final}; retry with prefixcap push {final} "
                                    f"{self.cfg.push_to_hub}") from err
        self.accelerator.print(f"prefixcap train: pushed {final} to the Hub repo {self.cfg.push_to_hub}", flush=True)

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

