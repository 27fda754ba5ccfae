"""Training checkpoints: round trip, loadable as a model, atomic against exceptions and kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import prefixcap.train.checkpoint as ckpt
from prefixcap.train.checkpoint import (
    TrainingState,
    checkpoint_path,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from prefixcap.model.mapping import MappingConfig
from prefixcap.model import CaptionConfig, CaptionModel


def _setup(lm_path: str, only_prefix: bool = True):
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    cfg = CaptionConfig(clip_model="tiny", language_model=lm_path, tokenizer=lm_path, only_prefix=only_prefix,
                        mapping=MappingConfig("mlp", prefix_size=16, prefix_length=3))
    model = CaptionModel(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, 2, 10)
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (tokens != 0).long()
    for _ in range(3):
        model(torch.randn(2, 16), tokens, mask).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_naming_follows_the_seed(tmp_path):
    assert checkpoint_path(tmp_path, "demo_model", "latest").name == "demo_model_latest.ckpt"
    assert checkpoint_path(tmp_path, "demo_model", 3).name == "demo_model_3.ckpt"


def test_round_trip_restores_everything(tmp_path, tiny_gpt2):
    model, opt, sched = _setup(tiny_gpt2, only_prefix=False)
    state = TrainingState(epoch=1, batch_in_epoch=5, global_step=9, samples_seen=72)
    path = save_checkpoint(tmp_path / "m_latest.ckpt", model, opt, sched, state, {"batch_size": 8})
    assert has_checkpoint(path)
    loaded = load_checkpoint(path)
    assert loaded.state == state and loaded.run_config == {"batch_size": 8}
    opt2 = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt2.load_state_dict(loaded.payload["optimizer"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert loaded.payload["scheduler"]["last_epoch"] == sched.state_dict()["last_epoch"] == 3
    # Every file in training_state/ loads with weights_only=True (never plain pickle).
    torch.load(path / "training_state" / "state.pt", weights_only=True)
    # The checkpoint is a model artifact: the fine-tuned LM is stored and loads back identically.
    assert (path / "lm").is_dir()
    again = CaptionModel.from_pretrained(path)
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def test_rng_states_round_trip(tmp_path, tiny_gpt2):
    import random

    import numpy as np

    model, opt, sched = _setup(tiny_gpt2)
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    path = save_checkpoint(tmp_path / "c.ckpt", model, opt, sched, TrainingState(), {})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ckpt.restore_rng_states(load_checkpoint(path).payload["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_failed_save_keeps_previous_checkpoint(tmp_path, tiny_gpt2, monkeypatch):
    model, opt, sched = _setup(tiny_gpt2)
    path = tmp_path / "m_latest.ckpt"
    save_checkpoint(path, model, opt, sched, TrainingState(global_step=1), {})
    before = (path / "mapper.safetensors").read_bytes()
    with torch.no_grad():
        model.mapper.model[0].weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, sched, TrainingState(global_step=2), {})
    monkeypatch.undo()
    assert load_checkpoint(path).state.global_step == 1
    assert (path / "mapper.safetensors").read_bytes() == before
    # The next save cleans the half-assembled folder up and replaces the checkpoint.
    save_checkpoint(path, model, opt, sched, TrainingState(global_step=3), {})
    assert load_checkpoint(path).state.global_step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_latest.ckpt"]


def test_interrupted_swap_falls_back_to_old(tmp_path, tiny_gpt2):
    model, opt, sched = _setup(tiny_gpt2)
    path = tmp_path / "m_latest.ckpt"
    save_checkpoint(path, model, opt, sched, TrainingState(global_step=4), {})
    os.replace(path, tmp_path / ".m_latest.ckpt.old")  # killed between the swap's two renames
    assert has_checkpoint(path)
    assert load_checkpoint(path).state.global_step == 4
    CaptionModel.from_pretrained(path)


_WRITER = textwrap.dedent("""
    import sys, torch
    from prefixcap.train.checkpoint import TrainingState, save_checkpoint
    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel
    from transformers import get_linear_schedule_with_warmup
    torch.set_num_threads(1)
    lm, out = sys.argv[1], sys.argv[2]
    model = CaptionModel(CaptionConfig(language_model=lm, tokenizer=lm, only_prefix=False,
                                       mapping=MappingConfig("mlp", prefix_size=16, prefix_length=3)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, 1, 10)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.mapper.parameters():
                p.fill_(float(step))
        save_checkpoint(out, model, opt, sched, TrainingState(global_step=step), {})
        print(step, flush=True)
""")


@pytest.mark.slow
def test_kill_during_saves_leaves_a_loadable_checkpoint(tmp_path, tiny_gpt2):
    """Real kill -9 at arbitrary moments of a save loop: the checkpoint found is always complete."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    out = tmp_path / "m_latest.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for delay in (0.13,):  # one kill: each new interpreter costs seconds on a busy machine
        proc = subprocess.Popen([sys.executable, str(script), tiny_gpt2, str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, text=True)
        try:
            assert proc.stdout.readline().strip() != ""  # first checkpoint complete, saves continue
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        loaded = load_checkpoint(out)
        step = loaded.state.global_step
        assert step >= 1
        model = CaptionModel.from_pretrained(out)  # weights belong to the same save as the state
        assert all(torch.all(p == float(step)) for p in model.mapper.parameters())
        json.loads((loaded.path / "config.json").read_text())
