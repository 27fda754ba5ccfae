"""A prediction keyed by a file name two reference images share is reported, never scored (issue 24)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_file_name_shared_by_two_reference_images_is_reported_not_scored(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text("\n".join(json.dumps(r) for r in [
        {"key": "a", "image": "train/x.jpg", "captions": ["a red square on a table", "a red box"]},
        {"key": "b", "image": "val/x.jpg", "captions": ["a blue circle in the sky", "a blue ball"]},
        {"key": "c", "image": "val/y.jpg", "captions": ["a green triangle", "a green shape"]},
    ]) + "\n")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"key": "x.jpg", "caption": "a red square on a table"}) + "\n"
                     + json.dumps({"key": "y.jpg", "caption": "a green triangle"}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "prefixcap.cli", "evaluate", "--predictions", str(preds),
                           "--references", str(refs), "--no_clipscore", "--metrics", "bleu,cider", "--tokenizer",
                           "simple", "--output_dir", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["counts"]["scored"] == 1  # y.jpg alone; x.jpg is neither train/x.jpg nor val/x.jpg
    assert "x.jpg" in report["problems"]["unknown_images"]
    assert any("more than one reference image" in n and "'x.jpg'" in n for n in report["notices"])
