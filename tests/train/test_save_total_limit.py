"""--save_total_limit past 10 epochs (issue 24): the newest epoch checkpoints are kept, by number, not by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers_data import make_dataset

REPO = Path(__file__).resolve().parents[2]


def test_save_total_limit_keeps_epochs_10_and_11_not_8_and_9(tiny_gpt2, tmp_path):
    # A name sort puts _10 and _11 before _2: it would delete _10 right after saving it and keep _8, _9.
    data = make_dataset(tmp_path / "data", tiny_gpt2, num_images=8, captions_per_image=1, prefix_length=4)
    out = tmp_path / "models"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data_dir", str(data), "--output_dir", str(out),
                           "--epochs", "12", "--batch_size", "8", "--num_workers", "0", "--mapping_type", "mlp",
                           "--only_prefix", "--save_every_steps", "0", "--save_total_limit", "2",
                           "--warmup_steps", "0"],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("demo_model_*.ckpt")) == [
        "demo_model_10.ckpt", "demo_model_11.ckpt", "demo_model_final.ckpt", "demo_model_latest.ckpt"]
    assert "demo_model_10.ckpt" in proc.stdout and "demo_model_8.ckpt" not in proc.stdout  # the report agrees
