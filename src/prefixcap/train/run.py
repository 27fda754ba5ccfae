"""The train stage's library entry: `train(TrainConfig(...))` runs one training run and returns a `TrainResult`.

`prefixcap train` (prefixcap.train.cli) is its command line. One code path (Hugging Face Accelerate)
runs on the CPU, one GPU, several GPUs or nodes (`accelerate launch` / `torchrun`) and under DeepSpeed
ZeRO. The run is built by prefixcap.train.setup and trained by prefixcap.train.loop; progress lines
go through the accelerator's main-process print; notices are logged.
"""

from __future__ import annotations

import contextlib
import sys

from prefixcap.devices import relaunch, select_devices, under_launcher
from prefixcap.runs import is_main_process
from prefixcap.train.config import TrainConfig, TrainConfigError, TrainResult
from prefixcap.train.loaders import check_data_dir


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
    check_data_dir(cfg)
    _check_attention(cfg, cpu)
    # The data stack, torch and Accelerate are imported only when a run starts.
    from prefixcap.locking import output_lock
    from prefixcap.train.loop import TrainingLoop
    from prefixcap.train.setup import build_run

    # Only the main process locks: the other ranks of this run write nothing but DeepSpeed's
    # optimizer partitions, inside saves the main process leads (a refused main process fails the
    # whole launch). A second run's main process is refused while this one, or any of its forked
    # DataLoader workers, lives.
    main_process = is_main_process()
    lock = output_lock(cfg.output_dir, "prefixcap train") if main_process else contextlib.nullcontext()
    with lock:
        return TrainingLoop(build_run(cfg, cpu)).run()
