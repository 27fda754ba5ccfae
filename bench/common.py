"""Shared benchmark plumbing: machine/version report, timing, load average and JSON results."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / "_work"  # git-ignored: models, synthetic data, scratch outputs
RESULTS = BENCH_DIR / "results"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def load_average() -> list[float]:
    """1/5/15-minute load averages: the machine is shared, so every figure carries its load."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, threads, GPU (if any) and library versions."""
    import numpy
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__},
        "load_average_start": load_average(),
    }
    try:
        import pyarrow
        import webdataset

        info["versions"].update(pyarrow=pyarrow.__version__, webdataset=getattr(webdataset, "__version__", "?"))
    except ImportError:
        pass
    return info


def print_header(name: str, settings: dict[str, Any], info: dict[str, Any]) -> None:
    print(f"== {name} ==")
    print(f"machine : {info['cpu']} | {info['cpu_count']} cores | torch threads {info['torch_threads']}"
          f" | GPU {info['gpu'] or 'none'}")
    print(f"versions: python {info['python']} " + " ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"load    : {info['load_average_start']} (1/5/15 min; the machine is shared)")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """with timer() as t: ...; t['s'] is the wall time in seconds."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start


def peak_rss_mb() -> float:
    """This process's peak resident set size (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_result(name: str, settings: dict[str, Any], info: dict[str, Any], figures: dict[str, Any],
                 notes: list[str] | None = None) -> Path:
    """bench/results/<name>.json with settings, machine, the measured figures and notes."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = {**info, "load_average_end": load_average()}
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": settings,
               "machine": info, "figures": figures, "notes": notes or []}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return path


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


THREADS_HELP = ("torch threads for both sides of every ratio (default 1: on a shared, oversubscribed "
                "machine OpenMP's spin-waiting makes 2 threads several times slower than 1; 0 = torch's default)")


def set_threads(n: int) -> None:
    """Same thread count for prefixcap and the reference (and for subprocesses via OMP_NUM_THREADS)."""
    import torch

    if n > 0:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
        os.environ["MKL_NUM_THREADS"] = str(n)


def add_seeded_args(p: Any, quick_help: str, workdir_help: str | None = None) -> None:
    """The flags every seeded quality benchmark shares: --quick, --workdir, --seeds, --threads."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--workdir", default=None, help=workdir_help)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--threads", type=int, default=1)


def seeded_config(cfg: Any, args: Any, quick: dict[str, Any], quick_workdir: Path) -> Any:
    """`cfg` (a dataclass with workdir and seeds) with the shared flags of add_seeded_args applied."""
    if args.quick:
        cfg = replace(cfg, **quick, workdir=str(quick_workdir))
    if args.workdir:
        cfg = replace(cfg, workdir=args.workdir)
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    return cfg
