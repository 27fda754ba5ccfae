"""LM modes on GPT-2 small (CPU): frozen / LoRA / fine-tuned, each with and without gradient checkpointing.

Each run is a fresh subprocess training a few optimizer steps of `prefixcap train` (random GPT-2 small
and synthetic CLIP embeddings, built offline by bench/builders.py) and reporting its own peak RSS
(ru_maxrss), the median time per optimizer step after the first, and the size of the model artifact
it saves (model only: no training state).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import REPO, WORK, load_average, machine_info, print_header, write_result

CHILD_CODE = r"""
import json, resource, shutil, statistics, sys, time
from pathlib import Path
import torch
from prefixcap.train.config import TrainConfig
from prefixcap.train.loop import TrainingLoop
from prefixcap.train.setup import build_run
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec.pop("threads"))
out = Path(spec["output_dir"])
cfg = TrainConfig(**spec)
trainer = TrainingLoop(build_run(cfg, cpu=True))
trainer._save = lambda tag: None  # checkpoints are timed by nobody here; the artifact is saved below
stamps = []
step = trainer.optimizer.step
def timed_step(*a, **k):
    r = step(*a, **k)
    stamps.append(time.perf_counter())
    return r
trainer.optimizer.step = timed_step
t0 = time.perf_counter()
trainer.run()
gaps = [b - a for a, b in zip(stamps, stamps[1:])]
art = out / "artifact"
shutil.rmtree(art, ignore_errors=True)
trainer.built.unwrapped().save_pretrained(art)
size = {p.name: sum(f.stat().st_size for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
        for p in art.iterdir()}
print("RESULT", json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "first_step_s": stamps[0] - t0 if stamps else None,
      "median_step_s": statistics.median(gaps) if gaps else None, "steps": len(stamps),
      "trainable": trainer.built.trainable, "artifact_bytes": sum(size.values()), "artifact_parts": size}))
"""

MODES = {
    "frozen": {"only_prefix": True},
    "lora": {"lora_rank": 8},
    "fine-tuned": {},
}


def run_child(data_dir: Path, mode: str, checkpointing: bool, batch: int, steps: int, threads: int) -> dict:
    spec = {"data_dir": str(data_dir), "output_dir": str(WORK / "out" / f"lm_modes_{mode}_{int(checkpointing)}"),
            "batch_size": batch, "epochs": 1, "max_steps": steps, "save_every_steps": 0, "save_every_epochs": 0,
            "num_workers": 0, "gpu_devices": "cpu", "log_every_steps": 10**9, "overwrite_output_dir": True,
            "warmup_steps": 0, "lr": 1e-4, "gradient_checkpointing": checkpointing, "threads": threads,
            **MODES[mode]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", CHILD_CODE, json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=str(REPO))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{mode} run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="frozen,lora,fine-tuned")
    p.add_argument("--no_checkpointing_pairs", action="store_true", help="skip the --gradient_checkpointing runs")
    args = p.parse_args(argv)
    settings = vars(args) | {"lm": "GPT-2 small, random weights (bench/builders.py)", "mapper": "mlp, K=10",
                             "captions": "synthetic COCO-like lengths"}
    info = machine_info()
    print_header("bench_lm_modes", settings, info)
    from bench.bench_train import make_dataset

    data = make_dataset(2000)
    figures: dict = {}
    for mode in args.modes.split(","):
        for ckpt in (False,) if args.no_checkpointing_pairs else (False, True):
            load = load_average()
            r = run_child(data, mode, ckpt, args.batch_size, args.steps, args.threads)
            r["load_before"] = load
            r["load_after"] = load_average()
            name = f"{mode}{' +gc' if ckpt else ''}"
            figures[name] = r
            print(f"{name:<16} peak RSS {r['peak_rss_mb']:7.0f} MB  step {r['median_step_s']:.2f} s  "
                  f"artifact {r['artifact_bytes'] / 2**20:7.1f} MB  trainable {r['trainable']:,}  "
                  f"load {r['load_before']} -> {r['load_after']}", flush=True)
    write_result("bench_lm_modes", settings, info, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
