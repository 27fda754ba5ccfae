"""The training step pinned by value: a short last accumulation group, gradient clipping that bites,
exact resume through both, and validation CIDEr that really is computed.

The optimizer step taken by `prefixcap train` is recomputed here from the step-before checkpoint
with plain torch (mean of the group's micro-batch losses, clip_grad_norm_, AdamW); the test also
shows the same recomputation without the rescale / without clipping gives other weights, so it
fails if either is dropped from the loop.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_dataset
from safetensors.torch import load_file

from prefixcap.checkpoint import load_checkpoint
from prefixcap.data.loader import CaptionDataset, LengthGroupedBatchSampler, collate, split_by_image
from prefixcap.model import CaptionModel
from prefixcap.train import train
from prefixcap.train_cli import parse_config

K = 4
SEED = 3
# 48 captions, batch 8: 6 micro-batches per epoch; 4 per step: groups of 4 then 2 (a short one).
BATCH, GAS = 8, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_gpt2) -> str:
    return str(make_dataset(tmp_path_factory.mktemp("train_values"), tiny_gpt2, num_images=24,
                            captions_per_image=2, prefix_length=K))


def _argv(data: str, out: Path, epochs: int, max_grad_norm: float, *extra: str) -> list[str]:
    return ["--data_dir", data, "--output_dir", str(out), "--epochs", str(epochs), "--batch_size", str(BATCH),
            "--gradient_accumulation_steps", str(GAS), "--num_workers", "0", "--mapping_type", "mlp",
            "--only_prefix", "--prefix_length", str(K), "--lr", "1e-2", "--warmup_steps", "0",
            "--save_every_steps", "0", "--save_every_epochs", "1", "--gpu_devices", "cpu", "--seed", str(SEED),
            "--max_grad_norm", str(max_grad_norm), "--log_every_steps", "1", *extra]


class _Killed(Exception):
    """Stands for a kill right after a checkpoint (the slow test does a real kill -9)."""


def _train_killed_after_step(argv: list[str], step: int, monkeypatch) -> None:
    from prefixcap import train as train_module

    save = train_module._Trainer._save

    def save_then_die(self, tag):
        save(self, tag)
        if tag == "latest" and self.state.global_step == step:
            raise _Killed

    monkeypatch.setattr(train_module._Trainer, "_save", save_then_die)
    with pytest.raises(_Killed):
        train(parse_config(argv + ["--save_every_steps", "1"]))
    monkeypatch.undo()


def _checkpoint_at_step(folder: Path, step: int) -> Path:
    """The epoch checkpoint written after optimizer step `step` (found by content, not by name)."""
    found = [p for p in sorted(folder.glob("demo_model_[0-9]*.ckpt")) if load_checkpoint(p).state.global_step == step]
    assert len(found) == 1, sorted(folder.iterdir())
    return found[0]


def _mapper(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "mapper.safetensors")


def _manual_step(ckpt: Path, data: str, epoch: int, start: int, group: int, max_grad_norm: float,
                 rescale: bool = True, clip: bool = True) -> dict[str, torch.Tensor]:
    """One optimizer step from checkpoint `ckpt` on micro-batches start..start+group-1 of `epoch`."""
    model = CaptionModel.from_pretrained(ckpt).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)
    opt.load_state_dict(load_checkpoint(ckpt).payload["optimizer"])  # moments and the scheduled lr
    ds = CaptionDataset(data)
    sampler = LengthGroupedBatchSampler(np.arange(len(ds)), ds.data.lengths(), BATCH, seed=SEED)
    sampler.set_epoch(epoch, start)
    batches = list(sampler)[:group]
    assert len(batches) == group
    losses = [model(*collate(ds.__getitems__(idx))) for idx in batches]
    loss = sum(losses) / (group if rescale else GAS)  # mean over the group's micro-batches
    loss.backward()
    if max_grad_norm and clip:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        assert norm > 2 * max_grad_norm  # the clip bites
    opt.step()
    return {k: v.detach().clone() for k, v in model.mapper.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_short_accumulation_group_is_rescaled_and_resume_is_exact(data, tmp_path, monkeypatch):
    # Step 1 (micro-batches 0-3) then stop; resume takes step 2 on the short group (4-5) alone.
    _train_killed_after_step(_argv(data, tmp_path / "run", 1, 0.0), 1, monkeypatch)
    step1 = tmp_path / "step1.ckpt"
    shutil.copytree(tmp_path / "run" / "demo_model_latest.ckpt", step1)
    assert load_checkpoint(step1).state.batch_in_epoch == GAS
    resumed = train(parse_config(_argv(data, tmp_path / "run", 1, 0.0, "--resume")))
    assert resumed.global_step == 2 and resumed.resumed_from is not None
    got = _mapper(tmp_path / "run" / "demo_model_final.ckpt")
    expected = _manual_step(step1, data, epoch=0, start=GAS, group=2, max_grad_norm=0.0)
    _assert_same(got, expected, atol=1e-6)
    # Without the rescale the short group's gradient is half as large, and Adam's step differs.
    unscaled = _manual_step(step1, data, epoch=0, start=GAS, group=2, max_grad_norm=0.0, rescale=False)
    assert _max_diff(unscaled, expected) > 1e-4


def test_clipping_bites_and_resume_through_it_is_bit_identical(data, tmp_path, monkeypatch):
    norm = 0.01
    straight = train(parse_config(_argv(data, tmp_path / "straight", 2, norm)))
    assert straight.global_step == 4
    _train_killed_after_step(_argv(data, tmp_path / "killed", 2, norm), 1, monkeypatch)
    step1 = tmp_path / "step1.ckpt"
    shutil.copytree(tmp_path / "killed" / "demo_model_latest.ckpt", step1)
    resumed = train(parse_config(_argv(data, tmp_path / "killed", 2, norm, "--resume")))
    assert resumed.global_step == 4
    # Bit for bit the uninterrupted run's weights, through a short group, clipping and an epoch change.
    _assert_same(_mapper(tmp_path / "killed" / "demo_model_final.ckpt"),
                 _mapper(tmp_path / "straight" / "demo_model_final.ckpt"))
    # Step 2 (the short group, clipped) recomputed by hand equals the end-of-epoch-1 checkpoint.
    after_step2 = _mapper(_checkpoint_at_step(tmp_path / "straight", 2))
    expected = _manual_step(step1, data, epoch=0, start=GAS, group=2, max_grad_norm=norm)
    _assert_same(after_step2, expected, atol=1e-6)
    unclipped = _manual_step(step1, data, epoch=0, start=GAS, group=2, max_grad_norm=norm, clip=False)
    assert _max_diff(unclipped, expected) > 1e-4


def test_validation_cider_is_computed_not_unavailable(data, tmp_path, capsys, monkeypatch):
    from prefixcap import evaluate as evaluate_module
    from prefixcap.caption import Captioner
    from prefixcap.data.shards import load_preprocessed

    calls = []
    real = evaluate_module.evaluate_predictions

    def recording(predictions, references, **kwargs):
        result = real(predictions, references, **kwargs)
        calls.append((dict(predictions), {k: list(v) for k, v in references.items()}, kwargs, result))
        return result

    monkeypatch.setattr(evaluate_module, "evaluate_predictions", recording)
    argv = _argv(data, tmp_path, 1, 0.0, "--val_fraction", "0.25", "--eval_cider_images", "3")
    result = train(parse_config(argv))
    out = capsys.readouterr().out
    assert "unavailable" not in out, out
    assert [c["step"] for c in result.cider] == [result.global_step]
    assert len(calls) == 1
    predictions, references, kwargs, returned = calls[0]
    assert kwargs["metrics"] == ["cider"]
    assert result.cider[0]["cider"] == returned["metrics"]["CIDEr"]
    # The references: the first 3 validation images (in caption order), each with all its validation captions.
    ds = load_preprocessed(data)
    _, val_idx = split_by_image(ds, 0.25, SEED)
    refs: dict[str, list[str]] = {}
    emb: dict[str, np.ndarray] = {}
    for ci in val_idx.tolist():
        s = ds[ci]
        key = str(s.image_index)
        if key in refs or len(refs) < 3:
            refs.setdefault(key, []).append(s.caption)
            emb[key] = s.embedding
    assert references == refs
    assert sum(len(v) for v in refs.values()) == 6  # two captions per image: none lost, none extra
    # The predictions: the final model's greedy caption of each of those images, under its own key.
    captioner = Captioner(CaptionModel.from_pretrained(tmp_path / "demo_model_final.ckpt"))
    texts = captioner.caption_embeddings(np.stack([emb[k] for k in refs]))
    assert predictions == dict(zip(refs, texts))


@pytest.mark.parametrize("extra", [("--val_fraction", "0.25", "--eval_cider_images", "0"),  # CIDEr not asked for
                                   ("--eval_cider_images", "3")])  # no validation images to caption
def test_no_cider_when_not_asked_or_nothing_to_caption_and_no_notice(data, tmp_path, capsys, extra):
    result = train(parse_config(_argv(data, tmp_path, 1, 0.0, *extra)))
    assert result.cider == []
    assert "CIDEr" not in capsys.readouterr().out


def test_group_seed_depends_on_seed_rank_and_step_and_fits_torch():
    from prefixcap.train import _group_seed

    seeds = {_group_seed(s, r, t) for s in (0, 42) for r in (0, 1) for t in range(50)}
    assert len(seeds) == 200
    assert all(0 <= x < 2 ** 63 for x in seeds)  # torch.manual_seed takes it on every platform
    assert _group_seed(42, 0, 7) == _group_seed(42, 0, 7)


def test_failing_cider_is_one_notice_and_training_goes_on(data, tmp_path, capsys, monkeypatch):
    from prefixcap import evaluate as evaluate_module

    def broken(*args, **kwargs):
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(evaluate_module, "evaluate_predictions", broken)
    argv = _argv(data, tmp_path, 1, 0.0, "--val_fraction", "0.25", "--eval_cider_images", "2",
                 "--eval_every_steps", "1")
    result = train(parse_config(argv))
    out = capsys.readouterr().out
    assert result.global_step == 2 and result.cider == [] and len(result.val_losses) >= 2
    assert out.count("prefixcap train: notice: CIDEr during training unavailable (scorer exploded); "
                     "validation loss only") == 1
