"""What a training run shows and leaves behind: its opening line, checkpoints with their model card, the Hub upload."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefixcap.errors import first_line
from prefixcap.train.config import TrainConfig, TrainResult, TrainRuntimeError

if TYPE_CHECKING:
    from prefixcap.train.setup import BuiltRun


def announce(built: BuiltRun, result: TrainResult) -> None:
    """One line: what is trained, on what data and hardware, for how many steps."""
    cfg, c, state = built.cfg, built.unwrapped().config, built.state
    where = f"resuming {result.resumed_from} at epoch {state.epoch + 1}, step {state.global_step}" \
        if built.resume_from else "starting"
    built.accelerator.print(
        f"prefixcap train: {where}; {c.language_model} ({c.lm_family}, "
        f"{c.lm_mode if c.lora is None else f'LoRA rank {c.lora.rank}'}) + {c.mapping.mapping_type} mapper, "
        f"K={c.prefix_length}; "
        f"{built.trainable:,} of {built.total_params:,} parameters trained; {len(built.loaders.sampler.indices):,} "
        f"training captions, {len(built.loaders.val_idx):,} validation; {built.world} process(es) on "
        f"{built.device}, batch {cfg.batch_size}x{built.world}x{cfg.gradient_accumulation_steps}, "
        f"{built.schedule.steps_per_epoch} steps/epoch, {built.schedule.total_steps} steps, "
        f"precision {built.accelerator.mixed_precision}")


def save(built: BuiltRun, result: TrainResult, tag: str | int) -> None:
    """Write checkpoint {prefix}_{tag}.ckpt (all processes take part) and list it in the result."""
    from prefixcap.train.checkpoint import checkpoint_path, save_checkpoint

    cfg = built.cfg
    path = checkpoint_path(cfg.output_dir, cfg.output_filename_prefix, tag)
    model = built.unwrapped()
    _refresh_card(built, result, model)
    # Optimizer state (2x the trained weights under AdamW) only in _latest, the resume point; epoch
    # and final checkpoints are models plus the small scheduler/RNG state.
    save_checkpoint(path, model, built.optimizer.optimizer, built.scheduler, built.state,
                    built.run_config, accelerator=built.accelerator, with_optimizer=tag == "latest",
                    merge_lora=cfg.merge_lora and tag == "final")
    if str(path) not in result.checkpoints:
        result.checkpoints.append(str(path))


def _refresh_card(built: BuiltRun, r: TrainResult, model) -> None:
    """The run and its last validation, for the model card every checkpoint carries."""
    cfg, state = built.cfg, built.state
    if r.val_losses:
        model.card_info["evaluation"] = {"validation_loss": r.val_losses[-1]["loss"],
                                         "step": r.val_losses[-1]["step"],
                                         **({"CIDEr": r.cider[-1]["cider"]} if r.cider else {})}
    model.card_info["training"] = {"epochs": state.epoch, "optimizer_steps": state.global_step,
                                   "samples_seen": state.samples_seen, "lr": cfg.lr,
                                   "batch_size": cfg.batch_size * built.world * cfg.gradient_accumulation_steps,
                                   "gradient_checkpointing": cfg.gradient_checkpointing}


def prune_epoch_checkpoints(built: BuiltRun, result: TrainResult) -> None:
    """--save_total_limit N: delete all but the N newest {prefix}_{epoch}.ckpt (main process)."""
    limit = built.cfg.save_total_limit
    if not limit or not built.accelerator.is_main_process:
        return
    import shutil

    from prefixcap.train.checkpoint import epoch_checkpoints

    for _, path in epoch_checkpoints(built.cfg.output_dir, built.cfg.output_filename_prefix)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)
        if str(path) in result.checkpoints:
            result.checkpoints.remove(str(path))


def push(cfg: TrainConfig, acc) -> None:
    """--push_to_hub: upload the final model (training state excluded) with the standard client."""
    from prefixcap.model.hub import upload_artifact
    from prefixcap.train.checkpoint import checkpoint_path

    final = checkpoint_path(cfg.output_dir, cfg.output_filename_prefix, "final")
    try:
        upload_artifact(final, cfg.push_to_hub, private=cfg.hub_private, token=cfg.hf_kwargs.get("token"))
    except Exception as err:  # noqa: BLE001 - network/auth errors: one line, the model stays on disk
        raise TrainRuntimeError(f"--push_to_hub {cfg.push_to_hub}: upload failed ({first_line(err)}); "
                                f"the model is saved at {final}; retry with prefixcap push {final} "
                                f"{cfg.push_to_hub}") from err
    acc.print(f"prefixcap train: pushed {final} to the Hub repo {cfg.push_to_hub}", flush=True)
