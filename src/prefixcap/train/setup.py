"""Everything a training run needs before its first step, built in the order bit-exact resume depends on.

`build_run(cfg, cpu)` opens the data, builds the Accelerator and the loaders, finds the resume point,
builds the model (new or resumed), the optimizer and its schedule, and restores the saved state. The
RNG is seeded just before the model is built (the mapper's initialisation draws from it), and the
saved RNG states are restored only after everything that draws at build time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixcap.errors import first_line
from prefixcap.train.accelerator import build_accelerator
from prefixcap.train.config import TrainConfig, TrainConfigError, TrainRuntimeError
from prefixcap.train.loaders import Loaders, build_loaders, check_validation_flags, open_data
from prefixcap.train.resume import (check_previous_run, check_resume, check_resume_retrieval, find_resume_point,
                                    restore_state, run_settings)

logger = logging.getLogger(__name__)


@dataclass
class Schedule:
    """A run's length in micro-batches and optimizer steps, and its warm-up."""

    micro_per_epoch: int  # this process's batches per epoch
    steps_per_epoch: int  # optimizer steps per epoch (the last accumulation group may be short)
    total_steps: int  # of the whole run (--epochs, capped by --max_steps)
    warmup_steps: int


@dataclass
class BuiltRun:
    """A training run ready for its first (or resumed) step."""

    cfg: TrainConfig
    accelerator: Any
    is_deepspeed: bool
    loaders: Loaders
    run_config: dict[str, Any]  # what checkpoints record and a resume must match (resume.run_settings)
    resume_from: Any | None  # the LoadedCheckpoint resumed from; None: a fresh start
    model: Any  # the CaptionModel, prepared by Accelerate
    optimizer: Any  # AdamW, prepared by Accelerate
    scheduler: Any  # warm-up then linear decay, stepped by hand once per optimizer step
    schedule: Schedule
    state: Any  # TrainingState: epoch, batch position, optimizer step, samples seen
    trainable: int  # parameters trained
    total_params: int

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self):
        return self.accelerator.device

    def unwrapped(self):
        """The CaptionModel itself (not Accelerate's or DeepSpeed's wrapper)."""
        return self.accelerator.unwrap_model(self.model)

    def to_device(self, batch):
        return [t.to(self.device, non_blocking=True) for t in batch]


def build_run(cfg: TrainConfig, cpu: bool) -> BuiltRun:
    """Build a run from its settings; refuses contradictory settings before anything heavy is loaded."""
    check_validation_flags(cfg)
    check_resume_retrieval(cfg)  # before open_data computes this run's prompts into the folder
    data = open_data(cfg)
    lengths = data.data.lengths()  # (N,) int32
    if len(lengths) == 0:
        raise TrainConfigError(f"--data_dir {cfg.data_dir}: the dataset has no captions")
    acc, is_deepspeed = build_accelerator(cfg, cpu)
    loaders = build_loaders(cfg, data, lengths, cpu, acc.num_processes, acc.process_index)
    check_previous_run(cfg, acc, Path(cfg.output_dir))
    num_train_captions = len(loaders.train_idx)
    run_config = run_settings(cfg, acc.num_processes, num_train_captions)
    resume_from = find_resume_point(cfg, acc)
    model = _build_model(cfg, data, lengths, num_train_captions, resume_from, run_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    model, optimizer, scheduler, schedule = _build_optimizer_and_schedule(cfg, acc, model, len(loaders.sampler),
                                                                          cpu, is_deepspeed)
    state = restore_state(cfg, acc, resume_from, optimizer, scheduler, is_deepspeed)
    return BuiltRun(cfg=cfg, accelerator=acc, is_deepspeed=is_deepspeed, loaders=loaders, run_config=run_config,
                    resume_from=resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                    schedule=schedule, state=state, trainable=trainable, total_params=total_params)


def _build_model(cfg: TrainConfig, data, lengths, num_train_captions: int, resume_from, run_config):
    """The CaptionModel, new or from the resume checkpoint (seeded: identical on every rank)."""
    import torch

    from prefixcap.train.model_spec import card_info, resolve_model

    manifest = data.manifest
    # The mapper's initialisation draws from the seeded RNG, identically on every rank.
    torch.manual_seed(cfg.seed)
    config, lm, tokenizer = resolve_model(cfg, manifest, data.data.embedding_dim, int(lengths.max()))
    if resume_from is not None:
        check_resume(resume_from, run_config, config)
    if resume_from is not None and not cfg.only_prefix:
        del lm  # fine-tuned: the LM weights come from the checkpoint's lm/ folder
        model = _load_resumed_model(cfg, config, resume_from)
    else:
        model = _new_model(config, lm, tokenizer, resume_from)
        del lm
    if cfg.gradient_checkpointing:
        try:
            model.enable_gradient_checkpointing()
        except ValueError as err:
            raise TrainConfigError(f"--gradient_checkpointing: {err}") from err
    model.card_info = card_info(cfg, manifest, num_train_captions)
    return model


def _load_resumed_model(cfg: TrainConfig, config, resume_from):
    from prefixcap.model.captioning import CaptionModel
    from prefixcap.model.language_models import LanguageModelError

    try:
        model = CaptionModel.from_pretrained(resume_from.path, **cfg.hf_kwargs)
    except (LanguageModelError, OSError, ImportError) as err:
        raise TrainRuntimeError(f"--resume: cannot load the model of {resume_from.path}: "
                                f"{first_line(err)}") from err
    model.config.language_model = config.language_model
    return model


def _new_model(config, lm, tokenizer, resume_from):
    from prefixcap.model.captioning import CaptionModel

    model = CaptionModel(config, lm=lm, tokenizer=tokenizer)
    if resume_from is not None:  # frozen LM: only the mapper was trained
        from safetensors.torch import load_file

        from prefixcap.model.captioning import MAPPER_WEIGHTS

        model.mapper.load_state_dict(load_file(resume_from.path / MAPPER_WEIGHTS))
    return model


def _build_optimizer_and_schedule(cfg: TrainConfig, acc, model, micro_per_epoch: int, cpu: bool,
                                  is_deepspeed: bool):
    """AdamW over the trained parameters, the warm-up/decay schedule, and Accelerate's wrapping.

    Returns (prepared model, prepared optimizer, scheduler, Schedule).
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if not cpu and not is_deepspeed else {}
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = math.ceil(cfg.warmup_ratio * total) if cfg.warmup_ratio is not None else cfg.warmup_steps
    if warmup >= total and cfg.lr > 0 and acc.is_main_process:
        # The seed's 5000 warm-up steps on a short run: the learning rate stays a small fraction
        # of --lr and the loss barely moves, with no other sign of why.
        peak = cfg.lr * total / warmup if warmup else cfg.lr
        logger.warning(f"prefixcap train: warning: warm-up ({warmup} steps) is not shorter than the run ({total} "
                       f"optimizer steps): the learning rate peaks at {peak:.2e}, not --lr {cfg.lr:g}; use "
                       "--warmup_ratio 0.1 or fewer --warmup_steps")
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(total, 1))
    # The scheduler is stepped by hand once per optimizer step (not prepared: Accelerate would
    # step it once per process), so --warmup_steps counts optimizer steps as in the seed.
    model, optimizer = acc.prepare(model, optimizer)
    return model, optimizer, scheduler, Schedule(micro_per_epoch=micro_per_epoch, steps_per_epoch=steps_per_epoch,
                                                 total_steps=total, warmup_steps=warmup)
