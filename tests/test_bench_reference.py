"""The benchmarks' reference loops (bench/reference.py) behave like the original ClipCap code."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import reference
from prefixcap.model.mapping import MappingConfig
from prefixcap.model import CaptionConfig, CaptionModel


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    torch.manual_seed(0)
    cfg = CaptionConfig(language_model=tiny_gpt2, mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32,
                                                                        prefix_length=4), only_prefix=True)
    return CaptionModel(cfg).eval()


def test_greedy_matches_hf_generate_and_stops_at_budget(model):
    prefix = model.prefix(torch.randn(1, 16))  # (1, K, D)
    ours = reference.greedy_generate2(model.lm, prefix, stop_token=-1, entry_length=12)
    assert len(ours) == 12  # no stop token reachable: runs the whole budget
    hf = model.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                           max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == hf[0].tolist()


def test_greedy_stops_at_stop_token(model):
    prefix = model.prefix(torch.randn(1, 16))
    full = reference.greedy_generate2(model.lm, prefix, stop_token=-1, entry_length=10)
    stop = full[3]
    cut = reference.greedy_generate2(model.lm, prefix, stop_token=stop, entry_length=10)
    assert cut == full[:full.index(stop) + 1]


def test_top_p_filter_keeps_the_argmax():
    logits = torch.tensor([[0.1, 5.0, 4.9, -3.0]])
    out = reference._top_p_filter(logits, 0.8)
    assert out.argmax().item() == 1 and torch.isinf(out[0, 3])


def test_beam_returns_sorted_beams_and_best_beats_greedy_score(model):
    prefix = model.prefix(torch.randn(1, 16))
    beams = reference.beam_generate(model.lm, prefix, stop_token=-1, beam_size=3, entry_length=6)
    assert len(beams) == 3
    scores = [s for _, s in beams]
    assert scores == sorted(scores, reverse=True)
    assert all(len(t) == 6 for t, _ in beams)

    def mean_logp(tokens):
        with torch.no_grad():
            emb = model.lm.get_input_embeddings()(torch.tensor([tokens]))
            logits = model.lm(inputs_embeds=torch.cat((prefix, emb), 1)).logits[0, prefix.shape[1] - 1:-1]
            return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).mean().item()

    best, score = beams[0]
    assert mean_logp(best) == pytest.approx(score, abs=1e-4)
    greedy = reference.greedy_generate2(model.lm, prefix, stop_token=-1, entry_length=6)
    assert score >= mean_logp(greedy) - 1e-5


def test_finished_beams_extend_with_free_pad(model):
    prefix = model.prefix(torch.randn(1, 16))
    first = reference.greedy_generate2(model.lm, prefix, stop_token=-1, entry_length=1)[0]
    beams = reference.beam_generate(model.lm, prefix, stop_token=first, beam_size=2, entry_length=5, pad_token=0)
    for tokens, _ in beams:
        if first in tokens:  # a finished beam's length counts up to its stop token only
            assert tokens[-1] == first


def test_global_pad_length_rule():
    lengths = [10] * 99 + [200]
    arr = np.array(lengths, float)
    assert reference.global_pad_length(lengths) == int(arr.mean() + 10 * arr.std())
    assert reference.global_pad_length([5, 6, 7]) == 7  # capped at the maximum


def test_reference_loss_equals_caption_model_loss(model):
    tokens = [np.array([5, 6, 7, 0]), np.array([8, 9, 0]), np.array([3, 4, 5, 6, 7, 0])]
    emb = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    data = reference.PaddedCaptionDataset(tokens, emb, prefix_length=4)
    ref = reference.ReferenceCaptioner(model.lm, model.mapper, 4, only_prefix=True).eval()
    t, m, e = (torch.stack(x) for x in zip(*(data[i] for i in range(3))))
    assert t.shape[1] == 6 and m.shape[1] == 10  # global length + K prefix positions in the mask
    with torch.no_grad():
        expected = ref(t, m, e).item()
        mask = m[:, 4:].long()
        got = model(e, t, mask).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # The original computes gradients for the frozen LM's weights too.
    assert all(p.requires_grad for p in model.lm.parameters())
    model.set_only_prefix(True)


def test_reference_trainer_runs_and_only_updates_the_mapper(model):
    tokens = [np.array([5, 6, 7, 0])] * 8
    emb = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    data = reference.PaddedCaptionDataset(tokens, emb, prefix_length=4)
    ref = reference.ReferenceCaptioner(model.lm, model.mapper, 4, only_prefix=True)
    lm_before = [p.detach().clone() for p in model.lm.parameters()]
    map_before = [p.detach().clone() for p in model.mapper.parameters()]
    times = reference.ReferenceTrainer(ref, data, batch_size=4, lr=1e-2, warmup_steps=0).run(3)
    assert len(times) == 3
    assert all(torch.equal(a, b) for a, b in zip(lm_before, model.lm.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(map_before, model.mapper.parameters()))
    assert any(p.grad is not None for p in model.lm.parameters())  # computed, just never applied
    model.set_only_prefix(True)
    model.lm.zero_grad(set_to_none=True)
