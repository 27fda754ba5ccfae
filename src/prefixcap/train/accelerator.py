"""The Accelerator a training run runs under: precision, DeepSpeed and tracker from the flags, with notices.

Imported when a run starts (it imports Accelerate and torch).
"""

from __future__ import annotations

from pathlib import Path

from prefixcap.train.config import TrainConfig, TrainConfigError


def build_accelerator(cfg: TrainConfig, cpu: bool):
    """Precision, DeepSpeed and tracker choices -> (Accelerator, whether DeepSpeed runs), notices printed."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mixed, notices = _precision(cfg, cpu)
    plugin = _deepspeed_plugin(cfg, cpu, notices)
    if cfg.log_with:
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[cfg.log_with]()
        if not available:
            raise TrainConfigError(f"--log_with {cfg.log_with}: the {cfg.log_with} package is not installed "
                                   f"(pip install {cfg.log_with})")
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        deepspeed_plugin=plugin, log_with=cfg.log_with,
        project_config=ProjectConfiguration(project_dir=str(out),
                                            logging_dir=cfg.logging_dir or str(out / "logs")),
        step_scheduler_with_optimizer=False)
    for n in notices:
        accelerator.print(f"prefixcap train: {n}")
    return accelerator, plugin is not None


def _precision(cfg: TrainConfig, cpu: bool) -> tuple[str, list[str]]:
    """--mixed_precision -> Accelerate's setting (always fp32 on the CPU), with notices to print."""
    import torch

    mixed = cfg.mixed_precision
    notices: list[str] = []
    if cpu:
        notices.append("no GPU found (or --gpu_devices cpu): training on the CPU in fp32")
        if mixed not in ("auto", "no"):
            notices.append(f"--mixed_precision {mixed} is ignored on the CPU: training in fp32")
        mixed = "no"
    elif mixed == "auto":
        mixed = "bf16" if torch.cuda.is_bf16_supported() else "no"
    return mixed, notices


def _deepspeed_plugin(cfg: TrainConfig, cpu: bool, notices: list[str]):
    """--use_deepspeed -> a DeepSpeedPlugin (None without it, or on the CPU with a notice)."""
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
