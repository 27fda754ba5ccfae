"""The training step pinned by value: a short last accumulation group, gradient clipping that bites,
exact resume through both, and validation CIDEr that really is computed.

The optimizer step taken by `prefixcap train` is recomputed here from the step-before checkpoint
with plain torch (mean of the group's micro-batch losses, clip_grad_norm_, AdamW); the test also
shows the same recomputation without the rescale / without clipping gives other weights, so it
fails if either is dropped from the loop.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_dataset
from safetensors.torch import load_file

from prefixcap.train.checkpoint import load_checkpoint
from prefixcap.data.loader import CaptionDataset, LengthGroupedBatchSampler, collate, split_by_image
from prefixcap.model.captioning import CaptionModel
from prefixcap.train.run import train
from prefixcap.train.cli import parse_config

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


def _train_killed_after_save(argv: list[str], monkeypatch, when) -> None:
    """Train, dying right after the first `_latest` save for which `when(state)` holds."""
    import prefixcap.train.loop as loop_module

    save = loop_module.TrainingLoop._save

    def save_then_die(self, tag):
        save(self, tag)
        if tag == "latest" and when(self.state):
            raise _Killed

    monkeypatch.setattr(loop_module.TrainingLoop, "_save", save_then_die)
    with pytest.raises(_Killed):
        train(parse_config(argv))
    monkeypatch.undo()


def _train_killed_after_step(argv: list[str], step: int, monkeypatch) -> None:
    _train_killed_after_save(argv + ["--save_every_steps", "1"], monkeypatch,
                             lambda state: state.global_step == step)


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
    import prefixcap.evaluate.scoring as evaluate_module
    from prefixcap.caption.captioner import Captioner
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
    from prefixcap.train.loop import _group_seed

    seeds = {_group_seed(s, r, t) for s in (0, 42) for r in (0, 1) for t in range(50)}
    assert len(seeds) == 200
    assert all(0 <= x < 2 ** 63 for x in seeds)  # torch.manual_seed takes it on every platform
    assert _group_seed(42, 0, 7) == _group_seed(42, 0, 7)


def test_failing_cider_is_one_notice_and_training_goes_on(data, tmp_path, capsys, monkeypatch):
    import prefixcap.evaluate.scoring as evaluate_module

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


# --- when the run stops --------------------------------------------------------------------------
@pytest.mark.parametrize("max_steps,epochs_done,batch_in_epoch,micro_batches", [
    (3, 1, GAS, 6 + GAS),  # mid-epoch 2: one whole epoch, then one group of epoch 2
    (2, 1, 0, 6),  # exactly at the end of epoch 1
])
def test_max_steps_stops_the_run_with_epochs_left(data, tmp_path, max_steps, epochs_done, batch_in_epoch,
                                                  micro_batches):
    """3 epochs of 2 steps, --max_steps: stop right after that step, with the resume point saved."""
    result = train(parse_config(_argv(data, tmp_path, 3, 0.0, "--max_steps", str(max_steps))))
    assert result.global_step == max_steps and result.epochs_completed == epochs_done
    assert result.samples_seen == micro_batches * BATCH
    final = load_checkpoint(tmp_path / "demo_model_final.ckpt").state
    latest = load_checkpoint(tmp_path / "demo_model_latest.ckpt").state  # where a resume would start
    assert (final.global_step, latest.global_step, latest.epoch, latest.batch_in_epoch) == (
        max_steps, max_steps, epochs_done, batch_in_epoch)
    assert len(result.epoch_train_losses) == (2 if batch_in_epoch else 1)  # a part-epoch has its own loss


@pytest.mark.parametrize("limit", [("--max_steps", "3"), ()], ids=["max_steps", "epochs"])
def test_resuming_a_finished_run_does_nothing_and_says_so(data, tmp_path, capsys, limit):
    argv = _argv(data, tmp_path, 1 if not limit else 3, 0.0, *limit)
    first = train(parse_config(argv))
    final = tmp_path / "demo_model_final.ckpt" / "mapper.safetensors"
    before, stamp = _mapper(final.parent), final.stat().st_mtime_ns
    capsys.readouterr()
    again = train(parse_config(argv + ["--resume"]))
    out = capsys.readouterr().out
    step, epoch = first.global_step, first.epochs_completed
    assert f"is already at the end of training (epoch {epoch}, step {step}); nothing to do" in out
    assert (again.global_step, again.epochs_completed, again.samples_seen) == (step, epoch, first.samples_seen)
    assert final.stat().st_mtime_ns == stamp  # the final model is not written again
    _assert_same(_mapper(final.parent), before)


def _spy_micro_batches(monkeypatch) -> list[tuple[float, int]]:
    """(loss, torch.initial_seed()) of every micro-batch's forward, in training order."""
    from prefixcap.model.captioning import CaptionModel

    seen: list[tuple[float, int]] = []
    forward = CaptionModel.forward

    def spy(self, emb, tokens, mask):
        loss = forward(self, emb, tokens, mask)
        seen.append((float(loss.detach()), torch.initial_seed()))
        return loss

    monkeypatch.setattr(CaptionModel, "forward", spy)
    return seen


def _stub_tracker(monkeypatch) -> dict[str, list]:
    """Accelerate's tracker API, recorded (no tracker package is installed here)."""
    import accelerate.utils
    from accelerate import Accelerator

    calls: dict[str, list] = {"init": [], "log": [], "end": []}
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    monkeypatch.setattr(Accelerator, "init_trackers",
                        lambda self, name, config=None, init_kwargs=None: calls["init"].append((name, config)))
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None:
                        calls["log"].append((step, dict(values))))
    monkeypatch.setattr(Accelerator, "end_training", lambda self: calls["end"].append(True))
    return calls


def _mean(xs) -> float:
    return sum(xs) / len(xs)


# Micro-batches per optimizer step (6 per epoch, groups of 4 then 2): step s covers GROUPS[s - 1].
GROUPS = [range(6 * e + a, 6 * e + b) for e in range(3) for a, b in ((0, 4), (4, 6))]


@pytest.mark.filterwarnings("ignore:`log_with=tensorboard` was passed")  # the tracker itself is stubbed
@pytest.mark.parametrize("epochs,log_every,max_steps,logged_steps", [
    (2, 1, 0, [1, 2, 3, 4]),  # every step
    (2, 2, 0, [2, 4]),
    (3, 2, 3, [2]),  # stopped at step 3, mid-epoch 2: its 4 micro-batches are in no log, but in the epoch loss
    (3, 3, 0, [3, 6]),  # the bar refreshes every gcd(10, 3) = 1 step: each log covers its own step only
    (3, 5, 0, [5]),  # refreshes at steps 5 and 10 and at every epoch end (2, 4, 6): step 5 alone
])
def test_losses_logged_and_per_epoch_are_means_of_the_micro_batch_losses(data, tmp_path, monkeypatch, epochs,
                                                                        log_every, max_steps, logged_steps):
    """The tracker gets the run's scalars once, then every --log_every_steps the loss averaged over the
    micro-batches since the progress bar's previous refresh (every gcd(10, --log_every_steps) steps and at
    each epoch end); each epoch's loss is the mean over its micro-batches; the dropout seed is set at the
    first micro-batch of each group from (seed, rank, step); the summary holds the result."""
    import json
    import math
    import time
    from dataclasses import asdict

    from prefixcap.train.loop import _group_seed

    calls = _stub_tracker(monkeypatch)
    seen = _spy_micro_batches(monkeypatch)
    started = time.perf_counter()
    result = train(parse_config(_argv(data, tmp_path, epochs, 0.0, "--log_with", "tensorboard",
                                      "--log_every_steps", str(log_every), "--max_steps", str(max_steps))))
    wall = time.perf_counter() - started
    steps = max_steps or 2 * epochs
    refreshes = [0] + [s for s in range(1, steps + 1) if s % math.gcd(10, log_every) == 0 or s % 2 == 0]
    losses = [loss for loss, _ in seen]
    assert len(seen) == GROUPS[steps - 1][-1] + 1 and result.global_step == steps
    [(name, config)] = calls["init"]
    assert name == "demo_model"
    assert config["epochs"] == epochs and config["lr"] == 1e-2 and config["batch_size"] == BATCH
    assert all(isinstance(v, (int, float, str, bool)) for v in config.values())
    assert [step for step, _ in calls["log"]] == logged_steps
    for step, values in calls["log"]:
        previous = max(r for r in refreshes if r < step)
        covered = [i for s in range(previous + 1, step + 1) for i in GROUPS[s - 1]]
        assert values["train/loss"] == pytest.approx(_mean([losses[i] for i in covered]), abs=1e-6), step
        # The LR after the step: linear decay from 1e-2 to 0 over the run's steps, no warm-up.
        assert values["train/lr"] == pytest.approx(1e-2 * (1 - step / steps))
        # Samples/s of the epoch so far: its samples over less time than the whole run took.
        in_epoch = (GROUPS[step - 1][-1] + 1 - 6 * ((step - 1) // 2)) * BATCH
        assert values["train/samples_per_s"] >= in_epoch / wall
    per_epoch = [losses[i:i + 6] for i in range(0, len(losses), 6)]
    assert result.epoch_train_losses == pytest.approx([_mean(e) for e in per_epoch], abs=1e-6)
    assert calls["end"] == [True]
    for i, (_, seed) in enumerate(seen):
        group_step = next(s for s, g in enumerate(GROUPS) if i in g)
        if i == GROUPS[group_step][0]:
            assert seed == _group_seed(SEED, 0, group_step), i
        else:  # seeded once per group: the later micro-batches continue that stream
            assert seed == seen[i - 1][1]
    # The summary's throughput is this run's samples over its time; the summary file is the result.
    assert 0 < result.train_seconds <= wall and isinstance(result.samples_seen, int)
    assert result.samples_per_second * result.train_seconds == pytest.approx(result.samples_seen)
    assert json.loads((tmp_path / "demo_model_summary.json").read_text()) == json.loads(json.dumps(asdict(result)))


def test_resume_from_an_epoch_end_is_bit_identical(data, tmp_path, monkeypatch):
    straight = train(parse_config(_argv(data, tmp_path / "straight", 2, 0.0)))
    _train_killed_after_save(_argv(data, tmp_path / "killed", 2, 0.0), monkeypatch,
                             lambda state: state.epoch == 1 and state.batch_in_epoch == 0)  # _end_epoch's save
    state = load_checkpoint(tmp_path / "killed" / "demo_model_latest.ckpt").state
    assert (state.epoch, state.batch_in_epoch, state.global_step) == (1, 0, 2)
    resumed = train(parse_config(_argv(data, tmp_path / "killed", 2, 0.0, "--resume")))
    assert resumed.global_step == straight.global_step == 4
    assert resumed.samples_seen == straight.samples_seen == 12 * BATCH
    _assert_same(_mapper(tmp_path / "killed" / "demo_model_final.ckpt"),
                 _mapper(tmp_path / "straight" / "demo_model_final.ckpt"))


def test_epoch_checkpoints_every_save_every_epochs(data, tmp_path):
    train(parse_config(_argv(data, tmp_path, 3, 0.0, "--save_every_epochs", "2")))
    names = sorted(p.name for p in tmp_path.glob("demo_model_*.ckpt"))
    # Epochs are counted from 1 for the period and named from 0 as the seed does: epoch 2 -> demo_model_1.
    assert names == ["demo_model_1.ckpt", "demo_model_final.ckpt", "demo_model_latest.ckpt"]
    assert load_checkpoint(tmp_path / "demo_model_1.ckpt").state.global_step == 4


def test_progress_bar_counts_each_epochs_batches_from_the_resume_point(data, tmp_path, capsys, monkeypatch):
    _train_killed_after_step(_argv(data, tmp_path, 2, 0.0), 1, monkeypatch)
    capsys.readouterr()
    train(parse_config(_argv(data, tmp_path, 2, 0.0, "--resume")))
    err = capsys.readouterr().err
    # Epoch 1 resumes at micro-batch 4 of 6 (the bar starts there, not at 0), then epoch 2 runs 0..6.
    assert "epoch 1/2:  67%|██████▋   | 4/6 [" in err and "epoch 1/2:   0%" not in err
    assert "epoch 1/2: 100%|██████████| 6/6 [" in err
    assert "epoch 2/2:   0%|          | 0/6 [" in err and "epoch 2/2: 100%|██████████| 6/6 [" in err
    assert "batch/s, loss=" in err and "epoch 3/2" not in err


def test_a_longer_resumed_run_follows_its_own_schedule_from_the_saved_step(data, tmp_path, monkeypatch):
    """--max_steps 2 then --resume with --max_steps 4: steps 3 and 4 use the 4-step schedule's LR at steps
    2 and 3 (5e-3, 2.5e-3), not the finished 2-step schedule's last LR (0)."""
    used: list[float] = []
    adamw_step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    train(parse_config(_argv(data, tmp_path, 3, 0.0, "--max_steps", "2")))
    assert used == pytest.approx([1e-2, 5e-3])
    used.clear()
    resumed = train(parse_config(_argv(data, tmp_path, 3, 0.0, "--max_steps", "4", "--resume")))
    assert resumed.global_step == 4
    assert used == pytest.approx([5e-3, 2.5e-3])


def test_a_validation_image_that_fails_to_caption_is_named_in_the_one_notice(data, tmp_path, capsys, monkeypatch):
    """A failed item is never scored as an empty caption: CIDEr is skipped with the image and the reason."""
    from dataclasses import replace

    import prefixcap.caption.pipeline as pipeline

    real = pipeline.caption_items

    def second_fails(*args, **kwargs):
        for n, result in enumerate(real(*args, **kwargs)):
            yield replace(result, captions=[], error="decoder exploded") if n == 1 else result

    monkeypatch.setattr(pipeline, "caption_items", second_fails)
    result = train(parse_config(_argv(data, tmp_path, 1, 0.0, "--val_fraction", "0.25", "--eval_cider_images", "3")))
    out = capsys.readouterr().out
    assert result.cider == []
    notices = [line for line in out.splitlines() if "CIDEr during training unavailable" in line]
    assert len(notices) == 1
    assert re.fullmatch(r"prefixcap train: notice: CIDEr during training unavailable \(validation image \d+: "
                        r"decoder exploded\); validation loss only", notices[0]), notices[0]
