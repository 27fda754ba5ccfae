"""Paths that travel (issue 24): local model folders are recorded resolved, so a dataset and a model work from
any folder; a name that is neither a local folder nor reachable fails at once, in one line.

The first test is a new user's whole flow across folders, so it also pins two first-hour items
that need the same runs: .tar shards without --input_format, and --num_workers sized to the machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from prep_helpers import simple_webdataset

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def manifest_images(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["num_images"]


def _run(args: list, cwd: Path, offline: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "src"),
           "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    if not offline:  # a machine whose network does not reach the Hub
        env.pop("HF_HUB_OFFLINE")
        env.pop("TRANSFORMERS_OFFLINE", None)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, cwd=str(cwd), capture_output=True, text=True,
                          timeout=240, check=False, **kwargs)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return proc


def test_relative_model_folders_are_recorded_resolved_and_work_from_elsewhere(tiny_clip, tiny_gpt2, tmp_path):
    models = Path(tiny_clip).parent  # holds clip/ and gpt2/
    assert (models / "gpt2").resolve() == Path(tiny_gpt2).resolve()
    simple_webdataset(tmp_path / "wds", num_tars=1, per_tar=4)
    data = tmp_path / "data"
    # the seed's command on .tar shards without --input_format (issue 24, first hour): read as webdataset, said
    prep = _run([REPO / "create_dataset.py", "--input_dataset", tmp_path / "wds" / "000.tar",
                 "--output_folder", data, "--clip_model", "clip", "--tokenizer_model_type", "gpt2",
                 "--tokenizer_model_variant", "gpt2", "--device", "cpu", "--no_progress", "--num_prepro_workers", "0"],
                cwd=models)
    assert prep.returncode == 0, prep.stderr
    assert "reading 1 .tar shard(s) as --input_format webdataset" in prep.stderr
    assert manifest_images(data) == 4
    manifest = json.loads((data / "manifest.json").read_text())
    assert (manifest["clip_model"], manifest["tokenizer"]) == (str(Path(tiny_clip).resolve()),
                                                              str(Path(tiny_gpt2).resolve()))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # default --num_workers on a 1-CPU machine (first hour): sized to it, so no torch warning about workers
    train = _run([REPO / "train.py", "--data_dir", data, "--output_dir", "models", "--epochs", "1",
                  "--batch_size", "4", "--mapping_type", "mlp", "--only_prefix", "--warmup_steps", "0",
                  "--prefix_length", "4"], cwd=elsewhere,
                 preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert train.returncode == 0, train.stderr
    assert "worker processes in total" not in train.stderr  # torch's warning about too many workers
    config = json.loads((elsewhere / "models" / "demo_model_final.ckpt" / "config.json").read_text())
    # what `caption --model` loads from any other folder (relative names would be looked up on the Hub)
    assert (config["clip_model"], config["language_model"], config["tokenizer"]) == (
        str(Path(tiny_clip).resolve()), str(Path(tiny_gpt2).resolve()), str(Path(tiny_gpt2).resolve()))

def test_a_name_that_is_no_folder_fails_at_once_when_the_hub_is_unreachable(tiny_gpt2, tmp_path):
    from helpers_data import make_dataset

    data = make_dataset(tmp_path / "data", tiny_gpt2, num_images=4, captions_per_image=1, prefix_length=4)
    for offline in (True, False):
        started = time.time()
        proc = _run([REPO / "train.py", "--data_dir", data, "--output_dir", tmp_path / "models",
                     "--language_model_variant", "demo_output/lm"], cwd=tmp_path, offline=offline)
        elapsed = time.time() - started
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip()
        assert len(line.splitlines()) == 1, line
        assert "--language_model_variant demo_output/lm" in line and "no folder 'demo_output/lm'" in line
        assert ("HF_HUB_OFFLINE is set" if offline else "no connection to 127.0.0.1") in line
        assert elapsed < 30, f"{elapsed:.0f} s to fail"
