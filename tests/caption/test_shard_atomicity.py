"""Caption output shards appear under their final name only when complete (issue 24): a kill -9 of
`prefixcap caption --output_dir` never leaves a truncated file that a glob of the folder takes for a shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from prefixcap.model import CaptionConfig, CaptionModel
from prefixcap.model.mapping import MappingConfig
from prep_helpers import image_bytes, write_tar

REPO = Path(__file__).resolve().parents[2]
PER_TAR = 8


def _in_progress(out: Path) -> bool:
    """A shard being written: a temporary file, or a shard file whose stats are not written yet."""
    if not out.is_dir():
        return False
    names = {p.name for p in out.iterdir()}
    return (any(n.endswith(".tmp") and ".jsonl." in n for n in names)  # not caption_settings.json's
            or any(n.endswith(".jsonl") and f"{n[:-6]}_stats.json" not in names for n in names))


def test_a_kill_9_mid_shard_leaves_no_truncated_shard_under_a_final_name(tmp_path, tiny_clip, tiny_gpt2):
    torch.manual_seed(0)
    model = CaptionModel(CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                                       mapping=MappingConfig(prefix_size=16, prefix_length=4), max_token_length=8))
    model_dir = model.save_pretrained(tmp_path / "model")
    for t in range(4):
        write_tar(tmp_path / "wds" / f"{t:05d}.tar",
                  [(f"t{t}_{i}", {"jpg": image_bytes(t * 10 + i, size=(48, 40))}) for i in range(PER_TAR)])
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "prefixcap.cli", "caption", "--model", str(model_dir),
                             str(tmp_path / "wds"), "--output_dir", str(out), "--output_format", "jsonl",
                             "--batch_size", "1", "--num_workers", "1", "--no_progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not _in_progress(out):
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before a shard was seen in progress"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    for shard in out.glob("*.jsonl"):  # what a reader globbing the folder takes for shards
        rows = [json.loads(line) for line in shard.read_text().splitlines()]
        assert len(rows) == PER_TAR, f"{shard.name}: {len(rows)} of {PER_TAR} rows under its final name"
