"""A new user's first hour (issue 13): every command runs as a real subprocess; exit codes and messages.

The seed's two commands back to back, refusals that are one clear line (never a traceback), runs
that find nothing usable failing instead of "succeeding", duplicate tar members and keys counted,
a previous run's checkpoints protected, and one writer per output folder (flock, freed by kill -9).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_data import make_dataset
from prep_helpers import image_bytes, simple_webdataset, write_tar

REPO = Path(__file__).resolve().parents[1]
SIZE = (40, 30)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": "", **extra}


def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`prefixcap ARGS` in a fresh process; the combined output must never hold a traceback."""
    proc = subprocess.run([sys.executable, "-m", "prefixcap.cli", *map(str, args)], env=_env(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return proc


def seed_train(data: str | Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The seed's `python3 train.py` with tiny sizes (the seed's warm-up default kept)."""
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data_dir", str(data), "--output_dir", str(out),
                           "--output_filename_prefix", "demo_model", "--epochs", "1", "--batch_size", "8",
                           "--num_workers", "0", "--mapping_type", "mlp", *map(str, extra)],
                          env=_env(), cwd=str(REPO), capture_output=True, text=True, timeout=240, check=False)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return proc


def preprocess_args(inputs, out, clip, lm, *extra, fmt="webdataset"):
    inputs = [inputs] if isinstance(inputs, (str, Path)) else inputs
    return ["preprocess", "--input_dataset", *map(str, inputs), "--output_folder", str(out), "--input_format", fmt,
            "--clip_model", clip, "--tokenizer_model_type", "gpt2", "--tokenizer_model_variant", lm,
            "--device", "cpu", "--no_progress", "--num_prepro_workers", "0", *map(str, extra)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_gpt2) -> Path:
    """A tiny dataset preprocessed with K=10 (24 images, 48 captions)."""
    return make_dataset(tmp_path_factory.mktemp("first_hour_data"), tiny_gpt2, prefix_length=10)


# ------------------------------------------------------------------ train: the seed's commands

@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, tiny_clip, tiny_gpt2):
    """The seed README's two commands back to back: preprocess with K=10, then train with K=40."""
    work = tmp_path_factory.mktemp("seed_run")
    simple_webdataset(work / "wds", num_tars=2, per_tar=4, size=SIZE)
    prep = cli(*preprocess_args(str(work / "wds" / "{000..001}.tar"), work / "data", tiny_clip, tiny_gpt2,
                                "--prefix_length", "10"))
    assert prep.returncode == 0, prep.stderr
    train = seed_train(work / "data", work / "models", "--prefix_length", "40", "--mixed_precision", "bf16",
                       "--threads", "1", "--save_every_steps", "1")
    return work, prep, train


def test_seed_commands_back_to_back_train_and_name_the_first_epoch_0(seed_run):
    work, _, train = seed_run
    assert train.returncode == 0, train.stderr
    assert "--prefix_length 40 (the dataset was preprocessed with 10" in train.stderr
    assert sorted(p.name for p in (work / "models").glob("*.ckpt")) == [
        "demo_model_0.ckpt", "demo_model_final.ckpt", "demo_model_latest.ckpt"]
    config = json.loads((work / "models" / "demo_model_final.ckpt" / "config.json").read_text())
    assert config["mapping"]["prefix_length"] == 40


def test_short_run_warns_about_warm_up_and_bf16_on_cpu(seed_run):
    _, _, train = seed_run
    # 8 captions, batch 8, 1 epoch: 1 step against the seed's 5000 warm-up steps
    assert "warning: warm-up (5000 steps) is not shorter than the run (1 optimizer steps)" in train.stderr
    assert "--warmup_ratio" in train.stderr
    assert "--mixed_precision bf16 is ignored on the CPU: training in fp32" in train.stdout + train.stderr
    # save_pretrained's shard bar is switched off during saves (it broke the epoch bar)
    assert "Writing model shards" not in train.stderr


def test_previous_run_refused_then_overwritten_with_save_total_limit(seed_run):
    work, _, _ = seed_run
    models = work / "models"
    again = seed_train(work / "data", models)
    assert again.returncode == 2
    assert "holds a previous run's checkpoints" in again.stderr and "--resume" in again.stderr
    assert "--overwrite_output_dir" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    both = seed_train(work / "data", models, "--warmup_steps", "3", "--warmup_ratio", "0.1")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    fresh = seed_train(work / "data", models, "--overwrite_output_dir", "--epochs", "3", "--save_total_limit", "2",
                       "--warmup_ratio", "0.5", "--save_every_steps", "0")
    assert fresh.returncode == 0, fresh.stderr
    assert "warm-up" not in fresh.stderr
    assert sorted(p.name for p in models.glob("*.ckpt")) == [
        "demo_model_1.ckpt", "demo_model_2.ckpt", "demo_model_final.ckpt", "demo_model_latest.ckpt"]
    summary = json.loads((models / "demo_model_summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["resumed_from"] is None


def test_broken_checkpoint_on_resume_is_one_line_exit_1(seed_run, tmp_path):
    import shutil

    work, _, _ = seed_run
    out = tmp_path / "models"
    shutil.copytree(work / "models", out)
    (out / "demo_model_latest.ckpt" / "lm" / "config.json").write_text("{not json")  # a damaged fine-tuned LM
    k = json.loads((out / "demo_model_latest.ckpt" / "config.json").read_text())["mapping"]["prefix_length"]
    proc = seed_train(work / "data", out, "--resume", "--epochs", "4", "--prefix_length", str(k))
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prefixcap train: error: --resume: cannot load the model of") and "config.json" in last


def test_wrong_invocations_are_one_line(data, tmp_path):
    nope = seed_train(tmp_path / "nope", tmp_path / "m")
    assert nope.returncode == 2 and "the folder does not exist" in nope.stderr
    assert "manifest.json" not in nope.stderr
    split = seed_train(data, tmp_path / "m", "--val_fraction", "0.99")
    assert split.returncode == 2 and "leaves no training images out of 24" in split.stderr
    flash = seed_train(data, tmp_path / "m", "--attn_implementation", "flash_attention_2")
    assert flash.returncode == 2 and "flash_attn package is not installed" in flash.stderr
    for proc in (nope, split, flash):
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list((tmp_path / "m").glob("*.ckpt"))


def test_ctrl_c_during_training_says_how_to_resume(data, tmp_path):
    out = tmp_path / "models"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--data_dir", str(data), "--output_dir", str(out),
                             "--epochs", "200", "--batch_size", "4", "--num_workers", "0", "--save_every_steps", "1",
                             "--mapping_type", "mlp", "--only_prefix"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not (out / "demo_model_latest.ckpt").exists():
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted;" in err and "demo_model_latest.ckpt" in err and "--resume" in err


def test_second_writer_is_refused_until_the_first_is_killed(data, tmp_path):
    out = tmp_path / "models"
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--data_dir", str(data), "--output_dir", str(out),
                              "--epochs", "500", "--batch_size", "4", "--num_workers", "0", "--save_every_steps", "0",
                              "--save_every_epochs", "0", "--mapping_type", "mlp", "--only_prefix"],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / ".prefixcap.lock"
        deadline = time.time() + 120
        while time.time() < deadline and f"PID {first.pid}" not in (lock.read_text() if lock.exists() else ""):
            time.sleep(0.05)
        second = seed_train(data, out, "--overwrite_output_dir", "--save_every_steps", "0")
        assert second.returncode == 1, second.stderr
        assert f"PID {first.pid}" in second.stderr and "being written by another process" in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    third = seed_train(data, out, "--overwrite_output_dir", "--save_every_steps", "0")
    assert third.returncode == 0, third.stderr
    assert (out / "demo_model_final.ckpt").is_dir()


def _hold_lock(target: Path, kind: str) -> subprocess.Popen:
    code = ("import sys, time; from prefixcap.locking import output_lock\n"
            f"with output_lock({str(target)!r}, 'holder', kind={kind!r}):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_preprocess_and_caption_respect_the_output_lock(seed_run, tiny_clip, tiny_gpt2, tmp_path):
    work, _, _ = seed_run
    out = tmp_path / "data"
    args = preprocess_args(str(work / "wds" / "{000..001}.tar"), out, tiny_clip, tiny_gpt2)
    holder = _hold_lock(out, "folder")
    try:
        refused = cli(*args)
        assert refused.returncode == 1 and f"PID {holder.pid}" in refused.stderr
        assert not (out / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert cli(*args).returncode == 0

    predictions = tmp_path / "captions.jsonl"
    caption = ["caption", str(work / "data"), "--input_format", "preprocessed", "--model",
               str(work / "models" / "demo_model_final.ckpt"), "--output", str(predictions), "--no_progress",
               "--device", "cuda"]
    holder = _hold_lock(predictions, "file")
    try:
        refused = cli(*caption)
        assert refused.returncode == 1 and f"PID {holder.pid}" in refused.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    done = cli(*caption)
    assert done.returncode == 0, done.stderr
    # --device cuda on a machine without CUDA: one notice, then the CPU
    assert "--device 'cuda' requested but CUDA is not available; using cpu" in done.stderr
    assert len(predictions.read_text().splitlines()) == 8


def test_evaluate_device_cuda_falls_back_to_cpu(tmp_path):
    preds = tmp_path / "preds.jsonl"
    refs = tmp_path / "refs.jsonl"
    preds.write_text("".join(json.dumps({"key": str(i), "caption": f"a red circle {i}"}) + "\n" for i in range(3)))
    refs.write_text("".join(json.dumps({"key": str(i), "captions": [f"a red circle {i}", "a circle"]}) + "\n"
                            for i in range(3)))
    proc = cli("evaluate", "--predictions", preds, "--references", refs, "--metrics", "bleu", "--no_clipscore",
               "--no_spice", "--tokenizer", "simple", "--device", "cuda", "--output_dir", tmp_path / "eval")
    assert "--device 'cuda' requested but CUDA is not available; using cpu" in proc.stderr
    assert proc.returncode == 0, proc.stderr


def test_model_path_typo_and_unknown_openai_clip_name(seed_run, tiny_gpt2, tmp_path):
    work, _, _ = seed_run
    typo = str(work / "models" / "demo_model_fnal.ckpt")
    proc = cli("caption", str(work / "data"), "--input_format", "preprocessed", "--model", typo, "--no_progress")
    assert proc.returncode == 1  # a model that does not load is a runtime error, told in one line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "does not exist" in proc.stderr and "demo_model_final.ckpt" in proc.stderr
    assert "huggingface" not in proc.stderr.lower() and "offline" not in proc.stderr.lower()
    proc = cli(*preprocess_args(str(work / "wds" / "000.tar"), tmp_path / "out", "ViT-B/99", tiny_gpt2))
    assert proc.returncode == 2 and "ViT-B/32" in proc.stderr and "ViT-L/14" in proc.stderr
    assert "huggingface" not in proc.stderr.lower()


# ------------------------------------------------------------------ preprocess

def test_zero_usable_samples_fail_and_the_fixed_rerun_names_one_key(tiny_clip, tiny_gpt2, tmp_path):
    tars = [write_tar(tmp_path / "wds" / "000.tar", [
        (f"s{i}", {"jpg": image_bytes(i, size=SIZE), "caption": f"a photo {i}".encode(),
                   "json": json.dumps({"text": f"a photo {i}", "url": "x"}).encode()}) for i in range(3)])]
    out = tmp_path / "out"
    wrong = cli(*preprocess_args(tars[0], out, tiny_clip, tiny_gpt2))  # the default --wds_caption_key txt
    assert wrong.returncode == 1
    err = wrong.stderr
    assert "no usable sample: all 3 input samples were skipped (no_caption: 3" in err
    assert ".txt member (--wds_caption_key)" in err and ".caption, .jpg, .json" in err
    assert not (out / "manifest.json").exists()
    meta = cli(*preprocess_args(tars[0], tmp_path / "meta", tiny_clip, tiny_gpt2, "--wds_caption_in_metadata",
                                "--wds_caption_key", "caption"))
    assert meta.returncode == 1 and "json keys text, url" in meta.stderr

    fixed = cli(*preprocess_args(tars[0], out, tiny_clip, tiny_gpt2, "--wds_caption_key", "caption"))
    assert fixed.returncode == 2
    assert "wds_caption_key: folder has 'txt', this run asks for 'caption'" in fixed.stderr
    assert "--overwrite" in fixed.stderr and "clip_model" not in fixed.stderr
    assert len(fixed.stderr.strip().splitlines()) == 1
    over = cli(*preprocess_args(tars[0], out, tiny_clip, tiny_gpt2, "--wds_caption_key", "caption", "--overwrite"))
    assert over.returncode == 0, over.stderr
    assert json.loads((out / "manifest.json").read_text())["num_images"] == 3


def test_duplicate_members_and_keys_are_counted_and_lose_nothing(tiny_clip, tiny_gpt2, tmp_path):
    import io
    import tarfile

    from prefixcap.data.shards import load_preprocessed

    def member(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "000.tar", "w") as tar:
        for name, data in [("a.jpg", image_bytes(1, size=SIZE)), ("a.txt", b"first a"), ("a.txt", b"second a"),
                           ("b.jpg", image_bytes(2, size=SIZE)), ("b.txt", b"b"),
                           ("c.jpg", image_bytes(3, size=SIZE)), ("c.txt", b"c"),
                           ("b.txt", b"b again, later in the tar")]:
            member(tar, name, data)
    write_tar(tmp_path / "wds" / "001.tar", [("c", {"jpg": image_bytes(4, size=SIZE), "txt": b"c in tar 1"}),
                                             ("d", {"jpg": image_bytes(5, size=SIZE), "txt": b"d"})])
    out = tmp_path / "out"
    proc = cli(*preprocess_args(str(tmp_path / "wds" / "{000..001}.tar"), out, tiny_clip, tiny_gpt2))
    assert proc.returncode == 0, proc.stderr
    ds = load_preprocessed(out)
    m = ds.manifest
    assert sorted(s.key for s in ds) == ["a", "b", "c", "d"]  # nothing after the repeated member is lost
    assert next(s for s in ds if s.key == "a").caption == "first a"
    assert next(s for s in ds if s.key == "c").caption == "c"  # the first c is kept
    assert m.skipped == {"duplicate_member": 1, "duplicate_key": 2}, m.skipped

    files = tmp_path / "files"
    files.mkdir()
    (files / "x.jpg").write_bytes(image_bytes(6, size=SIZE))
    (files / "x.png").write_bytes(image_bytes(7, fmt="PNG", size=SIZE))
    (files / "x.txt").write_text("x")
    (files / "y.jpg").write_bytes(image_bytes(8, size=SIZE))
    (files / "y.txt").write_text("y")
    proc = cli(*preprocess_args(files, tmp_path / "out_files", tiny_clip, tiny_gpt2, fmt="files"))
    assert proc.returncode == 0, proc.stderr
    assert load_preprocessed(tmp_path / "out_files").manifest.skipped == {"duplicate_key": 1}


def test_files_format_writes_no_empty_shards_and_stores_truncated_text(tiny_clip, tiny_gpt2, tmp_path):
    from prefixcap.data.shards import SHARD_DIR, load_preprocessed

    files = tmp_path / "files"
    files.mkdir()
    for i in range(4):
        (files / f"{i}.jpg").write_bytes(image_bytes(i, size=SIZE))
        (files / f"{i}.txt").write_text(f"a photo number {i}")
    (files / "3.txt").write_text("a very long caption " * 50_000)  # 1 MB
    out = tmp_path / "out"
    proc = cli(*preprocess_args(files, out, tiny_clip, tiny_gpt2, "--samples_per_shard", "2",
                                "--max_token_length", "16", fmt="files"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["shards"]) == 2 and len(list((out / SHARD_DIR).glob("*.json"))) == 2
    assert "into 2 shards" in proc.stdout and ", 2 shards," in proc.stdout
    ds = load_preprocessed(out)
    long = next(s for s in ds if s.key == "3")
    assert len(long.tokens) == 16 and long.caption.startswith("a very long") and len(long.caption) < 200
    assert m["num_truncated"] == 1


# ------------------------------------------------------------------ small things

def test_help_texts_show_true_defaults():
    for stage in ("preprocess", "train"):
        proc = cli(stage, "--help")
        assert proc.returncode == 0
        text = re.sub(r"\s+", " ", proc.stdout)
        assert "(default: None)" not in text
        # a switch's stored default says nothing (--no_progress stores True); switches show none
        assert not re.search(r"--(no_progress|only_prefix|overwrite\w*|normalize_prefix|jpeg_draft) [^-]*\(default", text)
        for option in re.split(r" (?=--\w)", text):
            assert option.count("(default") <= 1, option
    assert "hide the progress bar (default" not in re.sub(r"\s+", " ", cli("preprocess", "--help").stdout)


def test_make_bench_runs_the_package_and_braceexpand_is_declared():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^bench:.*\n\t(.+)$", makefile, re.M).group(1)
    assert "-m bench.run_all" in recipe
    proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--help"], cwd=str(REPO), env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r'"braceexpand[>=<]', (REPO / "pyproject.toml").read_text())
