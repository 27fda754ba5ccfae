"""The train stage: data loading, the seed's command, refusals, exact resume after kill -9, 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_dataset
from safetensors.torch import load_file

from prefixcap.train.checkpoint import load_checkpoint
from prefixcap.data.loader import (
    CaptionDataset,
    LengthGroupedBatchSampler,
    SequentialBatchSampler,
    collate,
    make_loader,
    split_by_image,
)
from prefixcap.data.shards import load_preprocessed
from prefixcap.model.captioning import CaptionModel
from prefixcap.train.config import TrainConfig
from prefixcap.train.run import train
from prefixcap.train.cli import main, parse_config

REPO = Path(__file__).resolve().parents[2]
K = 4  # prefix length the test datasets were "preprocessed" with


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO / "src")}


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, tiny_gpt2) -> str:
    return str(make_dataset(tmp_path_factory.mktemp("gpt2_data"), tiny_gpt2, prefix_length=K))


@pytest.fixture(scope="module")
def t5_data(tmp_path_factory, tiny_t5) -> str:
    return str(make_dataset(tmp_path_factory.mktemp("t5_data"), tiny_t5, family="seq2seq", prefix_length=K))


def seed_argv(data: str, out: Path, mapping: str = "transformer", only_prefix: bool = True, epochs: int = 1,
              extra: tuple[str, ...] = ()) -> list[str]:
    """The seed README's command line with tiny sizes."""
    argv = ["--data_dir", data, "--output_dir", str(out), "--output_filename_prefix", "demo_model",
            "--epochs", str(epochs), "--save_every_epochs", "1", "--save_every_steps", "2",
            "--prefix_length", str(K), "--prefix_size", "16", "--mapping_type", mapping,
            *(["--only_prefix"] if only_prefix else []), "--num_layers", "2", "--normalize_prefix",
            "--use_deepspeed", "--gpu_devices", "0",
            "--batch_size", "8", "--num_workers", "0", "--warmup_steps", "2", "--lr", "1e-3"]
    return argv + list(extra)


# --- data loading ----------------------------------------------------------------------------
def test_dataset_rows_match_the_shard_reader(gpt2_data):
    ds = CaptionDataset(gpt2_data)
    assert ds._reader is not None  # the pread path is in use
    ref = load_preprocessed(gpt2_data)
    for i in range(len(ds)):
        tokens, emb = ds[i]
        assert np.array_equal(tokens, ref[i].tokens) and np.array_equal(emb.astype(np.float32), ref[i].embedding)


def test_collate_pads_to_longest_in_batch():
    batch = collate([(np.array([5, 6, 7], np.int32), np.ones(4, np.float16)),
                     (np.array([8], np.int32), np.zeros(4, np.float16))])
    assert batch.tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.embeddings.shape == (2, 4) and batch.tokens.dtype == torch.int64


def _batches(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_length_grouped_sampler_is_deterministic_complete_and_resumable():
    rng = np.random.default_rng(0)
    n = 1000
    indices = np.arange(n) * 3  # arbitrary dataset indices
    lengths = rng.integers(3, 60, n)
    s = LengthGroupedBatchSampler(indices, lengths, batch_size=16, seed=7, mega_batch_mult=8)
    e0, e1 = _batches(s, 0), _batches(s, 1)
    assert len(e0) == len(s) == 63
    assert sorted(i for b in e0 for i in b) == sorted(indices.tolist())  # every caption once per epoch
    assert e0 == _batches(LengthGroupedBatchSampler(indices, lengths, 16, seed=7, mega_batch_mult=8), 0)
    assert e0 != e1  # reshuffled each epoch
    assert _batches(s, 1, start=10) == e1[10:]  # resume mid-epoch at a batch position
    # Length grouping: far less padding than random batches.
    pos = {v: i for i, v in enumerate(indices.tolist())}

    def padding(batches):
        return sum(max(lengths[pos[i]] for i in b) * len(b) - sum(lengths[pos[i]] for i in b) for b in batches)

    random_batches = _batches(LengthGroupedBatchSampler(indices, lengths, 16, seed=7, group_by_length=False), 0)
    assert padding(e0) < 0.3 * padding(random_batches)
    # Batches mix the dataset (not one shard / one region per batch).
    assert np.mean([np.ptp(b) for b in e0]) > n


def test_sampler_splits_batches_between_ranks():
    indices, lengths = np.arange(50), np.ones(50, int)
    ranks = [LengthGroupedBatchSampler(indices, lengths, 4, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    b0, b1 = _batches(ranks[0], 3), _batches(ranks[1], 3)
    assert len(b0) == len(b1) == 7  # 13 batches: the last rank repeats one so both take 7 steps
    flat0, flat1 = {i for b in b0 for i in b}, {i for b in b1[:-1] for i in b}
    assert not flat0 & flat1 and flat0 | {i for b in b1 for i in b} == set(range(50))
    ev = [SequentialBatchSampler(indices, lengths, 8, 2, r) for r in (0, 1)]
    assert sorted(i for s in ev for b in s for i in b) == list(range(50))


def test_validation_split_is_by_image(gpt2_data):
    data = load_preprocessed(gpt2_data)
    train_idx, val_idx = split_by_image(data, 0.25, seed=3)
    images = data.caption_image_indices()
    assert len(train_idx) + len(val_idx) == len(data) and len(val_idx) > 0
    assert not set(images[train_idx]) & set(images[val_idx])
    assert len(set(images[val_idx])) == round(0.25 * data.num_images)


def test_loader_with_workers_yields_the_sampler_batches(gpt2_data):
    ds = CaptionDataset(gpt2_data)
    lengths = ds.data.lengths()
    sampler = LengthGroupedBatchSampler(np.arange(len(ds)), lengths, 5, seed=0)
    sampler.set_epoch(2)
    expected = list(sampler)
    got = list(make_loader(ds, sampler, num_workers=2, pin_memory=False, seed=0))
    assert len(got) == len(expected)
    for batch, idx in zip(got, expected):
        assert batch.mask.sum(1).tolist() == lengths[idx].tolist()
        assert batch.tokens.shape[1] == lengths[idx].max()  # padded to this batch's longest only


# --- the command line ------------------------------------------------------------------------
@pytest.mark.parametrize("lm", ["gpt2", "t5"])
@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
@pytest.mark.parametrize("only_prefix", [True, False])
def test_seed_command_trains(lm, mapping, only_prefix, gpt2_data, t5_data, tmp_path, capsys):
    data = gpt2_data if lm == "gpt2" else t5_data
    assert main(seed_argv(data, tmp_path, mapping, only_prefix)) == 0
    out = capsys.readouterr().out
    assert "training on the CPU" in out and "--use_deepspeed needs a GPU" in out
    final = tmp_path / "demo_model_final.ckpt"
    for name in ("demo_model_latest.ckpt", "demo_model_0.ckpt", "demo_model_final.ckpt", "demo_model_summary.json"):
        assert (tmp_path / name).exists(), name
    model = CaptionModel.from_pretrained(final)
    c = model.config
    assert (c.mapping.mapping_type, c.only_prefix, c.normalize_prefix, c.prefix_length) == (mapping, only_prefix,
                                                                                          True, K)
    assert c.lm_family == ("causal" if lm == "gpt2" else "seq2seq")
    assert (final / "lm").is_dir() == (not only_prefix)
    summary = json.loads((tmp_path / "demo_model_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["samples_seen"] == 48  # 48 captions, batch 8
    assert np.isfinite(summary["epoch_train_losses"]).all()


def test_loss_goes_down_on_a_small_dataset(tmp_path, tiny_gpt2):
    captions = ["a red circle on the left.", "one big blue star at the top.", "a tiny green square in the middle.",
                "a photo of a yellow cross on the right."]
    data = make_dataset(tmp_path / "data", tiny_gpt2, num_images=4, captions_per_image=1, num_shards=1,
                        captions=captions, prefix_length=K)
    cfg = parse_config(["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--epochs", "40",
                        "--batch_size", "4", "--lr", "1e-2", "--warmup_steps", "0", "--num_workers", "0",
                        "--save_every_epochs", "0", "--save_every_steps", "0", "--mapping_type", "mlp",
                        "--val_fraction", "0"])
    result = train(cfg)
    losses = result.epoch_train_losses
    assert len(losses) == 40
    assert losses[-1] < 0.25 * losses[0], losses


def test_validation_loss_is_logged(gpt2_data, tmp_path, capsys):
    cfg = parse_config(seed_argv(gpt2_data, tmp_path, "mlp", True, epochs=2,
                                 extra=("--val_fraction", "0.25", "--eval_every_steps", "3",
                                        "--eval_cider_images", "3")))
    result = train(cfg)
    steps = [v["step"] for v in result.val_losses]
    assert steps == sorted(set(steps)) and 3 in steps and result.global_step in steps
    assert all(np.isfinite(v["loss"]) for v in result.val_losses)
    out = capsys.readouterr().out
    assert "validation loss" in out
    # CIDEr on a few validation images, or a notice saying why it is unavailable.
    assert [c["step"] for c in result.cider] == steps or "CIDEr during training unavailable" in out


def test_unknown_flag_is_an_error_but_hf_kwargs_are_accepted(gpt2_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--data_dir", gpt2_data, "--no_such_flag", "3"])
    assert err.value.code == 2
    assert "--no_such_flag" in capsys.readouterr().err
    cfg = parse_config(["--data_dir", gpt2_data, "--cache_dir", str(tmp_path / "hf"), "--revision", "main",
                        "--trust_remote_code", "--token", "hf_x"])
    assert cfg.hf_kwargs == {"cache_dir": str(tmp_path / "hf"), "revision": "main", "trust_remote_code": True,
                             "token": "hf_x"}
    assert TrainConfig().lr == 2e-5 and TrainConfig().warmup_steps == 5000 and TrainConfig().batch_size == 256


@pytest.fixture(scope="module")
def other_gpt2(tmp_path_factory) -> str:
    """A GPT-2 whose tokenizer has another vocabulary than the dataset's."""
    from prefixcap.demo.tiny_models import build_tiny_gpt2

    return str(build_tiny_gpt2(tmp_path_factory.mktemp("other_gpt2"), vocab_size=300))


@pytest.mark.parametrize("case", ["prefix_size", "tokenizer", "family", "positions",
                                  "gpu_devices", "val_fraction", "data_dir"])
def test_refused_configurations(case, gpt2_data, other_gpt2, tiny_t5, tmp_path, capsys):
    base = ["--data_dir", gpt2_data, "--output_dir", str(tmp_path), "--num_workers", "0", "--batch_size", "8"]
    extra, message = {
        "prefix_size": (["--prefix_size", "512"], "--prefix_size 512 conflicts with the dataset"),
        "tokenizer": (["--language_model", other_gpt2], "different tokenizer"),
        "family": (["--language_model", tiny_t5], "is a seq2seq LM but the dataset"),
        "positions": (["--data_dir", str(make_dataset(tmp_path / "d", other_gpt2, prefix_length=120)),
                       "--language_model", other_gpt2], "exceeds"),
        "gpu_devices": (["--gpu_devices", "first"], "--gpu_devices 'first'"),
        "val_fraction": (["--val_fraction", "1.5"], "--val_fraction must be in [0, 1)"),
        "data_dir": (["--data_dir", str(tmp_path / "missing")], "the folder does not exist"),
    }[case]
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not list(tmp_path.glob("*.ckpt"))


def test_resume_with_other_settings_is_refused(gpt2_data, tmp_path, capsys):
    assert main(seed_argv(gpt2_data, tmp_path, "mlp", True, extra=("--max_steps", "2"))) == 0
    assert main(seed_argv(gpt2_data, tmp_path, "mlp", True, extra=("--resume", "--batch_size", "4"))) == 2
    assert "batch_size: checkpoint 8, now 4" in capsys.readouterr().err


# --- exact resume after kill -9 ------------------------------------------------------------
def _weights(folder: Path) -> dict[str, torch.Tensor]:
    w = {f"mapper.{k}": v for k, v in load_file(folder / "mapper.safetensors").items()}
    for f in sorted((folder / "lm").glob("*.safetensors")):
        w.update({f"lm.{k}": v for k, v in load_file(f).items()})
    return w


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(gpt2_data, tmp_path):
    """kill -9 mid-run, --resume, and the final weights equal an uninterrupted run's, bit for bit."""
    common = ("--batch_size", "4", "--gradient_accumulation_steps", "2", "--val_fraction", "0.2",
              "--num_workers", "1", "--save_every_epochs", "0")  # 38 training captions: 5 steps per epoch
    argv = seed_argv(gpt2_data, tmp_path / "killed", "transformer", only_prefix=False, epochs=4, extra=common)
    latest = tmp_path / "killed" / "demo_model_latest.ckpt"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if load_checkpoint(latest).state.global_step >= 4:
                    break
            except (FileNotFoundError, OSError, ValueError, RuntimeError):
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # a real kill -9, somewhere after step 4
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, err
    assert not (tmp_path / "killed" / "demo_model_final.ckpt").exists(), "the run finished before the kill"
    killed_at = load_checkpoint(latest).state
    assert 4 <= killed_at.global_step < 20

    resumed = train(parse_config(argv + ["--resume"]))
    assert resumed.resumed_from is not None and resumed.global_step == 20
    # The reference never checkpoints mid-run: checkpoint frequency must not change the result either.
    reference = train(parse_config(seed_argv(gpt2_data, tmp_path / "straight", "transformer", False, 4,
                                             extra=common + ("--save_every_steps", "0"))))
    assert reference.global_step == 20 and reference.samples_seen == resumed.samples_seen
    a = _weights(tmp_path / "killed" / "demo_model_final.ckpt")
    b = _weights(tmp_path / "straight" / "demo_model_final.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # The validation loss of the final model is the same too.
    assert resumed.val_losses[-1]["loss"] == pytest.approx(reference.val_losses[-1]["loss"], abs=1e-6)


# --- two processes (gloo) ----------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_cpu_run(gpt2_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), *seed_argv(gpt2_data, out, "mlp", True, epochs=1,
                                              extra=("--val_fraction", "0.25"))]
    proc = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    summary = json.loads((out / "demo_model_summary.json").read_text())
    assert summary["num_processes"] == 2
    # 36 training captions, batch 8 per process: 5 global batches -> 3 steps per process (one repeated).
    assert summary["global_step"] == 3 and summary["samples_seen"] == 48
    assert summary["val_losses"] and np.isfinite(summary["val_losses"][-1]["loss"])
    model = CaptionModel.from_pretrained(out / "demo_model_final.ckpt")
    assert model.config.only_prefix


def test_unit_norm_embeddings_without_normalize_prefix_get_a_notice(tiny_gpt2, tmp_path, capsys):
    """clip-retrieval embeddings are unit-norm; a model trained on them unnormalised would later see
    raw CLIP embeddings from images: the manifest's `normalized` says so and train warns."""
    data = make_dataset(tmp_path / "data", tiny_gpt2, num_images=4, num_shards=1, prefix_length=K,
                        manifest_overrides={"normalized": True})
    argv = ["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--epochs", "1", "--batch_size", "4",
            "--num_workers", "0", "--val_fraction", "0", "--warmup_steps", "0", "--only_prefix"]
    assert main(argv) == 0
    assert "L2-normalised but --normalize_prefix is off" in capsys.readouterr().err
    assert main(argv + ["--normalize_prefix", "--output_dir", str(tmp_path / "out2")]) == 0
    assert "L2-normalised" not in capsys.readouterr().err
