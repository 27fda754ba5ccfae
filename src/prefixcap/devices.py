"""Device choice every command shares: `--device` (CUDA when asked and present, else the CPU with a
one-line notice) and training's `--gpu_devices` (which GPUs, and a torchrun relaunch for several)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from prefixcap.errors import UsageError

logger = logging.getLogger(__name__)


def resolve_device(requested: str | None, prog: str = "prefixcap") -> str:
    """None -> cuda when available, else cpu; cuda -> cuda:LOCAL_RANK under a launcher; cpu with a notice
    (on stderr) when CUDA was asked for but is absent, so a command written for a GPU box still runs."""
    import torch

    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            print(f"{prog}: notice: --device {requested!r} requested but CUDA is not available; using cpu",
                  file=sys.stderr)
            return "cpu"
        local_rank = os.environ.get("LOCAL_RANK")
        if local_rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and requested in {"cuda", "cuda:0"}:
            return f"cuda:{int(local_rank) % torch.cuda.device_count()}"
        index = requested.partition(":")[2]
        if index.isdigit() and int(index) >= torch.cuda.device_count():
            print(f"{prog}: notice: --device {requested!r} but only {torch.cuda.device_count()} GPU(s) exist; "
                  "using cuda:0", file=sys.stderr)
            return "cuda:0"
    return requested


def under_launcher() -> bool:
    """True inside a process started by torchrun / accelerate launch (several ranks, or a LOCAL_RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def select_devices(gpu_devices: str | None, prog: str = "prefixcap train") -> tuple[bool, int]:
    """Apply --gpu_devices before CUDA starts: (use the CPU?, GPUs requested for this node).

    "0" is GPU 0 (the seed read it as "no GPU"), "0,1" those GPUs, "-1" all, "cpu" none.
    Under a launcher without an explicit value the launcher's assignment is kept.
    """
    import torch

    if gpu_devices is None:
        if under_launcher():
            return not torch.cuda.is_available(), 1
        gpu_devices = "0"
    value = gpu_devices.strip().lower()
    if value == "cpu":
        return True, 0
    if value == "-1":
        return not torch.cuda.is_available(), max(torch.cuda.device_count(), 1)
    ids = [x.strip() for x in value.split(",") if x.strip()]
    if not ids or not all(x.isdigit() for x in ids):
        raise UsageError(f'--gpu_devices {gpu_devices!r}: expected "0", "0,1,...", "-1" (all) or "cpu"')
    if not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    if not torch.cuda.is_available():
        return True, 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if under_launcher() and len(ids) < local_world:
        raise UsageError(f"--gpu_devices {gpu_devices!r} names {len(ids)} GPU(s) but the launcher "
                         f"started {local_world} processes on this node; name one GPU per process "
                         "or leave --gpu_devices out to keep the launcher's assignment")
    found = torch.cuda.device_count()
    if found < len(ids):
        logger.warning(f"{prog}: notice: --gpu_devices {gpu_devices!r} names {len(ids)} GPUs but only "
                       f"{found} exist; using {found}")
    return False, min(found, len(ids))


def relaunch(argv: list[str], nproc: int, module: str = "prefixcap.train.cli", prog: str = "prefixcap train") -> int:
    """Several GPUs asked for without a launcher: rerun `python -m module argv` under torchrun, one process each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    logger.warning(f"{prog}: {nproc} GPUs requested; launching {nproc} processes: {' '.join(cmd)}")
    return subprocess.call(cmd)
