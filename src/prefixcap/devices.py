"""The `--device` rule every command shares: CUDA when asked and present, else the CPU with a one-line notice."""

from __future__ import annotations

import os
import sys


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
