"""Training memory: peak RSS of `prefixcap train` on 1,000,000 captions vs 10,000 (synthetic embeddings).

Each run is a fresh subprocess (`python -m prefixcap.train.cli ...`, a few steps, GPT-2 small frozen) so
peaks don't mix. Two peaks are recorded: the training process's own (ru_maxrss, exact) and the
whole process tree's (main + loader workers, polled from /proc every 20 ms). A second pair uses a
tiny LM with the same tokenizer, where the data's share of memory is not hidden behind GPT-2's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import (
    REPO,
    THREADS_HELP,
    WORK,
    machine_info,
    print_header,
    ratio,
    set_threads,
    write_result,
)

CHILD_CODE = """
import json, resource, sys
from prefixcap.train.cli import main
code = main(sys.argv[2:])
print('PEAK_RSS_KB', json.dumps({'self': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      'children': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'code': code}))
"""


def _tree_rss_kb(pid: int) -> int:
    """RSS of pid and all its descendants, in KiB."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            stack.extend(int(c) for c in children)
        except (OSError, ValueError):
            continue
    return total


def run_child(data_dir: Path, steps: int, batch: int, workers: int, lm: str | None) -> dict:
    out = WORK / "out" / f"memory_{data_dir.name}"
    args = ["--data_dir", str(data_dir), "--output_dir", str(out), "--only_prefix", "--batch_size", str(batch),
            "--max_steps", str(steps), "--epochs", "1", "--save_every_steps", "0", "--save_every_epochs", "0",
            "--num_workers", str(workers), "--gpu_devices", "cpu", "--overwrite_output_dir"]
    if lm:
        args += ["--language_model", lm]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD_CODE, "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO))
    peak = [0]

    def poll():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    output, _ = proc.communicate()
    t.join()
    line = next((ln for ln in output.splitlines() if ln.startswith("PEAK_RSS_KB")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"training subprocess failed ({proc.returncode}):\n{output[-3000:]}")
    ru = json.loads(line.split(" ", 1)[1])
    return {"main_peak_mb": ru["self"] / 1024, "tree_peak_mb": peak[0] / 1024,
            "workers_max_peak_mb": ru["children"] / 1024}


def build_tiny_lm_same_tokenizer() -> Path:
    """GPT-2 shaped LM, width 64 / 2 layers, with GPT-2 small's tokenizer (so the dataset accepts it)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.builders import GPT2_DIR, GPT2_VOCAB, build_gpt2_small
    from prefixcap.model.language_models import load_tokenizer

    path = WORK / "models" / "gpt2-tiny-same-tokenizer"
    if (path / "config.json").is_file():
        return path
    build_gpt2_small()
    tok = load_tokenizer(str(GPT2_DIR))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, n_embd=64, n_layer=2, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps: a few minutes on 2 CPU cores")
    p.add_argument("--workers", type=int, default=2, help="prefixcap train --num_workers")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = p.parse_args(argv)
    set_threads(args.threads)
    q = args.quick
    steps = 3 if q else 20
    batch = 8 if q else 40
    small, large = 10_000, 1_000_000
    settings = {"threads": args.threads, "mode": "quick" if q else "full", "captions": [small, large], "captions_per_image": 5,
                "steps": steps, "batch_size": batch, "num_workers": args.workers,
                "lm": "GPT-2 small frozen (random weights); and a tiny LM with the same tokenizer"}
    info = machine_info()
    print_header("bench_memory", settings, info)
    from bench.bench_train import make_dataset

    print("writing synthetic datasets (reused when present) ...", flush=True)
    t0 = time.perf_counter()
    small_dir, large_dir = make_dataset(small), make_dataset(large)
    print(f"  done in {time.perf_counter() - t0:.0f}s")
    disk = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20 for d in (small_dir, large_dir)}
    figures: dict = {"dataset_disk_mb": {k: round(v, 1) for k, v in disk.items()}}
    tiny = build_tiny_lm_same_tokenizer()
    for label, lm in (("gpt2_small", None), ("tiny_lm", str(tiny))):
        runs = {}
        for name, d in (("10k", small_dir), ("1M", large_dir)):
            print(f"[{label}] training on {name} captions ...", flush=True)
            runs[name] = run_child(d, steps, batch, args.workers, lm)
            print("  " + ", ".join(f"{k} {v:.0f}" for k, v in runs[name].items()))
        figures[f"{label}_10k"] = {k: round(v, 1) for k, v in runs["10k"].items()}
        figures[f"{label}_1M"] = {k: round(v, 1) for k, v in runs["1M"].items()}
        figures[f"{label}_main_ratio"] = ratio(runs["1M"]["main_peak_mb"], runs["10k"]["main_peak_mb"])
        figures[f"{label}_tree_ratio"] = ratio(runs["1M"]["tree_peak_mb"], runs["10k"]["tree_peak_mb"])
        figures[f"{label}_main_delta_mb"] = round(runs["1M"]["main_peak_mb"] - runs["10k"]["main_peak_mb"], 1)
        print(f"  => 1M / 10k peak RSS: main {figures[f'{label}_main_ratio']}x, "
              f"process tree {figures[f'{label}_tree_ratio']}x")
    notes = ["tree peak = largest sum of RSS over the training process and its loader workers (shared pages "
             "counted once per process, so it over-states)."]
    write_result("memory", settings, info, figures, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
