"""The GPU check (bench/gpu_check.sh + bench/gpu_check.py): syntax, its CPU dry run end to end, its refusals."""

from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
sys.path.insert(0, str(REPO))

from bench import gpu_check  # noqa: E402

# Every phase's headline figure in the JSON, and the setting that goes with it.
PHASE_FIGURES = {"preprocess": ("preprocess_images_per_s", "batch_size"),
                 "caption": ("recaption_captions_per_s", "batch_size"),
                 "train": ("train_samples_per_s", "batch_size")}


def run_script(*args: str, env: dict[str, str] | None = None, timeout: float = 170) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_DRY_RUN")}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**base, "PYTHON": sys.executable, **(env or {})})


def test_shell_wrapper_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK), "bench/gpu_check.sh should be executable"


def test_module_compiles(tmp_path):
    py_compile.compile(str(REPO / "bench" / "gpu_check.py"), cfile=str(tmp_path / "gpu_check.pyc"), doraise=True)


def test_dry_run_end_to_end(tmp_path):
    """Every phase runs through prefixcap's entries on the CPU; the JSON holds a positive figure per phase."""
    out = tmp_path / "out"
    proc = run_script(str(out), "--dry-run", "--workdir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "gpu_check_dry_run.json").read_text())
    assert payload["settings"]["dry_run"] is True
    assert set(payload["phases"]) == set(PHASE_FIGURES)
    for phase, (key, setting) in PHASE_FIGURES.items():
        assert payload["phases"][phase]["status"] == "ok", payload["phases"][phase]
        assert payload["phases"][phase]["runs"], phase
        fig = payload["figures"][key]
        assert fig["value"] > 0 and fig[setting] > 0, (key, fig)
        assert fig["met"] is None  # a dry run judges no goal
    assert payload["figures"]["preprocess_images_per_s"]["goal"] == 5000
    assert payload["figures"]["recaption_captions_per_s"]["goal"] == 2000
    assert payload["figures"]["encoder_only_images_per_s"]["value"] > 0
    assert payload["figures"]["generate_only_captions_per_s"]["value"] > 0
    assert {"gpu", "versions", "cuda"} <= set(payload["machine"])
    assert {"torch", "transformers"} <= set(payload["machine"]["versions"])
    table = (out / "gpu_check_dry_run.md").read_text()
    assert "DRY RUN" in table and "| Re-caption" in table
    # the preprocess phase really tried several settings through `prefixcap preprocess`'s flags
    runs = payload["phases"]["preprocess"]["runs"]
    assert {r["jpeg_draft"] for r in runs} == {False, True}
    assert all(r["images"] == payload["settings"]["images"] for r in runs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_refuses_in_one_line(tmp_path):
    proc = run_script(str(tmp_path / "out"), timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "a CUDA GPU is needed" in lines[0] and "--dry-run" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_package_named_up_front(tmp_path):
    """A package the GPU image lacks is named in one line before anything runs, with the wheel folder to carry."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['braceexpand'] = None\n")
    env = {"PYTHONPATH": str(tmp_path)}
    proc = run_script(str(tmp_path / "out"), "--dry-run", env=env, timeout=60)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("gpu_check:")]
    assert len(lines) == 1 and "braceexpand" in lines[0] and gpu_check.WHEELS in lines[0], proc.stderr


def test_dry_run_from_the_environment(monkeypatch):
    monkeypatch.setenv("GPU_CHECK_DRY_RUN", "1")
    assert gpu_check.parse_args([]).dry_run is True
    monkeypatch.delenv("GPU_CHECK_DRY_RUN")
    assert gpu_check.parse_args([]).dry_run is False


def test_goals_judged_on_a_gpu_run():
    phases = {"preprocess": {"runs": [{"batch_size": 512, "num_prepro_workers": 16, "jpeg_draft": False,
                                       "images_per_s": 4000.0},
                                      {"batch_size": 512, "num_prepro_workers": 16, "jpeg_draft": True,
                                       "images_per_s": 6000.0}],
                             "encoder_only": {"batch_size": 512, "dtype": "float16", "images_per_s": 30000.0}},
              "caption": {"runs": [{"batch_size": 256, "captions_per_s": 1500.0},
                                   {"batch_size": 512, "captions_per_s": 1900.0}]},
              "train": {"runs": []}}
    figures = gpu_check.figures_from(phases, dry_run=False)
    pre = figures["preprocess_images_per_s"]
    assert (pre["value"], pre["jpeg_draft"], pre["met"]) == (6000.0, True, True)
    assert figures["preprocess_images_per_s_full_decode"]["value"] == 4000.0
    cap = figures["recaption_captions_per_s"]
    assert (cap["value"], cap["batch_size"], cap["met"]) == (1900.0, 512, False)
    assert figures["train_samples_per_s"]["value"] is None  # a phase without a run reports nothing, not zero
    payload = {"time": "t", "settings": {"dry_run": False}, "figures": figures,
               "machine": {"gpu": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2.11", "transformers": "5.17"},
                           "cuda": "13.0", "cpu_count": 16, "cpu": "x"},
               "phases": {"train": {"status": "killed after 150 s (budget 90 s)", "seconds": 150.0}}}
    table = gpu_check.render_markdown(payload)
    assert "GPU: NVIDIA H100 80GB HBM3" in table and "**not met**" in table and "| met |" in table
