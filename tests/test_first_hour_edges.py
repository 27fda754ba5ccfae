"""A new user's first hour, the edges of issue 24: each command run as a real process.

`train --data_dir` on raw tars, a wrong flag value in one line, help texts with their defaults, the
README's Python snippet on a machine without CUDA, and the docs a new user follows. (.tar shards
without --input_format and DataLoader workers sized to the machine: tests/test_paths_travel.py.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prep_helpers import simple_webdataset

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": "", **extra}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def _run(args: list[str], timeout: int = 240, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], env=_env(), cwd=str(REPO), capture_output=True,
                          text=True, timeout=timeout, check=False, **kwargs)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return proc


def test_train_on_raw_tars_says_it_is_not_a_preprocessed_folder(tmp_path):
    simple_webdataset(tmp_path / "wds", num_tars=2, per_tar=1)
    proc = _run([REPO / "train.py", "--data_dir", tmp_path / "wds", "--output_dir", tmp_path / "models"])
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1, proc.stderr
    assert "is not a preprocessed dataset folder" in line and "2 .tar file(s)" in line
    assert "prefixcap preprocess --input_dataset" in line and "interrupted" not in line


# One process calls every command's entry point (each builds its parser; no model is loaded).
FLAG_ERRORS = """
import contextlib, io, json, sys
from prefixcap.cli import main
out = {}
for argv in %r:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    out[argv[0]] = [code, err.getvalue()]
print(json.dumps(out))
"""


def test_a_wrong_flag_value_is_one_line_with_a_pointer_to_help():
    commands = [["train", "--data_dir", "d", "--epochs", "x"],
                ["preprocess", "--input_dataset", "x", "--batch_size", "0"],
                ["caption", "--model", "m", "x.jpg", "--batch_size", "x"], ["evaluate", "--limit", "x"],
                ["serve", "--model", "m", "--port", "x"], ["demo", "--seed", "x"], ["push", "a", "b", "--wrong"]]
    proc = _run(["-c", FLAG_ERRORS % (commands,)])
    results = json.loads(proc.stdout)
    for name, (code, err) in results.items():
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "usage:" not in err, (name, err)
        assert err.startswith(f"prefixcap {name}: error: ") and f"(see prefixcap {name} --help)" in err, (name, err)


HELP = """
import contextlib, io, json
from prefixcap.cli import main
out = {}
for name in ("train", "serve", "demo", "caption"):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            main([name, "--help"])
        except SystemExit:
            pass
    out[name] = " ".join(text.getvalue().split())
print(json.dumps(out))
"""


@pytest.mark.parametrize("command, flag, default", [
    ("train", "--epochs EPOCHS", "10"), ("train", "--lr LR", "2e-05"), ("train", "--seed SEED", "42"),
    ("train", "--mapping_type {mlp,projector,transformer,transformer_tokens}", "mlp"),
    ("train", "--weight_decay WEIGHT_DECAY", "0.0"), ("serve", "--port PORT", "8000"),
    ("serve", "--log_level {critical,error,warning,info,debug}", "info"), ("demo", "--seed SEED", "0"),
    ("caption", "--batch_size BATCH_SIZE", "128 greedy, 25 at beam 5"),
])
def test_help_shows_the_defaults(help_texts, command, flag, default):
    options = help_texts[command].split(" options: ", 1)[1]  # past the usage block
    entry = options.split(f" {flag} ", 1)[1].split(" --", 1)[0]
    assert f"(default: {default})" in entry, entry


@pytest.fixture(scope="module")
def help_texts() -> dict[str, str]:
    return json.loads(_run(["-c", HELP]).stdout)


SNIPPET = """
from prefixcap import Captioner
cap = Captioner.from_pretrained(%r, device="cuda")
print(str(cap.device))
print(cap.caption([%r], max_new_tokens=3)[0] is not None)
"""


def test_the_readme_snippet_with_cuda_falls_back_to_the_cpu_with_a_warning(tiny_clip, tiny_gpt2, tmp_path):
    from prefixcap.model import CaptionConfig, CaptionModel
    from prefixcap.model.mapping import MappingConfig
    from prep_helpers import image_bytes

    model = CaptionModel(CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                                       mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32, prefix_length=4)))
    path = model.save_pretrained(tmp_path / "model")
    (tmp_path / "a.jpg").write_bytes(image_bytes(1))
    proc = _run(["-c", SNIPPET % (str(path), str(tmp_path / "a.jpg"))])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cpu", "True"]
    assert "device='cuda' requested but CUDA is not available; using cpu" in proc.stderr


def test_the_docs_a_new_user_follows():
    readme = (REPO / "README.md").read_text()
    seed_commands = readme.index("python3 create_dataset.py")
    assert "source .venv/bin/activate" in readme[:seed_commands]  # said before the seed's commands
    quick = re.findall(r"--quick[^\n]*?~(\d+) s", readme + (REPO / "docs" / "demo.md").read_text())
    assert len(quick) >= 2 and len(set(quick)) == 1, quick  # one figure for the quick demo everywhere
    development = (REPO / "docs" / "development.md").read_text()
    assert "make test-fast" not in next(line for line in development.splitlines() if "CI" in line)
    assert "pip install -e '.[serve]'" in (REPO / "docs" / "serve.md").read_text()
