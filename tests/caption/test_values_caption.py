"""Decoding settings and scores pinned against the LM run directly.

Sampling settings must reach `generate` (a near-zero temperature or a tiny top_p is greedy; a
fixed seed gives exactly what `lm.generate` gives with the same settings), and the returned
scores must be the mean log-probability of the returned tokens with the end-of-text included
(greedy) or the length-normalised beam score (beam search), recomputed here by a plain forward pass.
"""

from __future__ import annotations

import pytest
import torch

from prefixcap.caption.captioner import Captioner
from prefixcap.generation import GenerationSettings
from prefixcap.model.mapping import MappingConfig
from prefixcap.model import CaptionConfig, CaptionModel

K, C = 4, 16
MAX_NEW = 10


@pytest.fixture(scope="module")
def cap(tiny_gpt2) -> Captioner:
    torch.manual_seed(0)
    config = CaptionConfig(language_model=tiny_gpt2, mapping=MappingConfig("mlp", prefix_size=C, prefix_length=K),
                           only_prefix=False, max_token_length=MAX_NEW)
    model = CaptionModel(config)
    with torch.no_grad():  # varied, not-too-peaked next-token distributions (the default init is flat)
        for p in model.lm.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
        # A larger end-of-text output row (tied with its input row): some captions end before
        # MAX_NEW tokens, some do not, so both kinds of score are checked.
        model.lm.get_output_embeddings().weight[model.tokenizer.eos_token_id] *= 2.0
    return Captioner(model)


@pytest.fixture(scope="module")
def emb() -> torch.Tensor:
    return torch.randn(6, C, generator=torch.Generator().manual_seed(1))


def _tokens(cap: Captioner, emb, seed: int | None = None, **settings) -> list[list[int]]:
    if seed is not None:
        torch.manual_seed(seed)
    return cap.generate(emb, GenerationSettings(max_new_tokens=MAX_NEW, **settings)).tokens


def test_near_zero_temperature_and_tiny_top_p_are_greedy(cap, emb):
    greedy = _tokens(cap, emb)
    assert len({tuple(t) for t in greedy}) > 1  # the inputs give different captions
    for seed in (0, 1, 2):
        assert _tokens(cap, emb, seed, do_sample=True, temperature=0.01, top_k=0) == greedy
        assert _tokens(cap, emb, seed, do_sample=True, top_p=1e-6, top_k=0) == greedy
    # ... while plain sampling with the same seeds is not greedy: the two checks above can fail.
    plain = [_tokens(cap, emb, seed, do_sample=True, top_k=0) for seed in (0, 1, 2)]
    assert all(p != greedy for p in plain)


def _direct(cap: Captioner, emb, seed: int, **gen) -> list[list[int]]:
    """lm.generate on the prefix, with no Captioner in between; trimmed at the first end-of-text."""
    eos = cap.tokenizer.eos_token_id
    with torch.no_grad():
        prefix = cap.model.prefix(emb)
        torch.manual_seed(seed)
        out = cap.model.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                                    max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=eos, **gen)
    rows = []
    for row in out.tolist():
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows


@pytest.mark.parametrize("gen", [
    {"temperature": 0.7, "top_k": 0, "top_p": 1.0},
    {"temperature": 1.5, "top_k": 0, "top_p": 0.6},
    {"temperature": 1.0, "top_k": 5, "top_p": 1.0},
])
def test_fixed_seed_sampling_equals_lm_generate_with_the_same_settings(cap, emb, gen):
    got = _tokens(cap, emb, seed=123, do_sample=True, **gen)
    assert got == _direct(cap, emb, 123, do_sample=True, **gen)
    # Sensitivity: the defaults (temperature 1, top_k 50, top_p 1) draw something else from that seed.
    assert got != _direct(cap, emb, 123, do_sample=True, temperature=1.0, top_k=50, top_p=1.0)


def _logprobs(cap: Captioner, emb_row: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """log p(token_i | prefix, tokens_<i) for each token, from one forward pass without cache."""
    with torch.no_grad():
        prefix = cap.model.prefix(emb_row[None])  # (1, K, D)
        ids = torch.tensor([tokens])
        inputs = torch.cat((prefix, cap.model.lm.get_input_embeddings()(ids)), dim=1)
        logp = cap.model.lm(inputs_embeds=inputs, use_cache=False).logits[0].float().log_softmax(-1)
    return torch.stack([logp[K - 1 + i, t] for i, t in enumerate(tokens)])


def test_greedy_scores_are_mean_log_prob_of_returned_tokens_with_eos(cap, emb):
    eos = cap.tokenizer.eos_token_id
    out = cap.generate(emb, GenerationSettings(max_new_tokens=MAX_NEW), return_scores=True)
    ended = 0
    for row, tokens, score in zip(emb, out.tokens, out.scores):
        finished = len(tokens) < MAX_NEW  # stopped by end-of-text (else by the length limit)
        ended += finished
        lp = _logprobs(cap, row, tokens + ([eos] if finished else []))
        assert score == pytest.approx(float(lp.mean()), abs=1e-4)
        assert abs(score - float(lp.sum())) > 1e-3 or len(lp) == 1
    assert 0 < ended < len(out.tokens)  # captions cut by end-of-text and by the length limit


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_scores_are_the_length_normalised_beam_score(cap, emb, length_penalty):
    eos = cap.tokenizer.eos_token_id
    settings = GenerationSettings(num_beams=3, num_return_sequences=2, max_new_tokens=MAX_NEW,
                                  length_penalty=length_penalty)
    out = cap.generate(emb, settings, return_scores=True)
    assert len(out.tokens) == len(out.scores) == 2 * emb.shape[0]
    for j, (tokens, score) in enumerate(zip(out.tokens, out.scores)):
        finished = len(tokens) < MAX_NEW
        lp = _logprobs(cap, emb[j // 2], tokens + ([eos] if finished else []))
        assert score == pytest.approx(float(lp.sum()) / len(lp) ** length_penalty, abs=1e-4), (j, tokens)
    # Beams of one input come best first.
    for i in range(emb.shape[0]):
        assert out.scores[2 * i] >= out.scores[2 * i + 1]


def test_a_one_token_caption_scores_its_own_log_prob(cap, emb):
    out = cap.generate(emb, GenerationSettings(max_new_tokens=1), return_scores=True)
    for row, tokens, score in zip(emb, out.tokens, out.scores):
        generated = tokens or [cap.tokenizer.eos_token_id]  # an immediate end-of-text is the one token
        assert len(generated) == 1
        assert score == pytest.approx(float(_logprobs(cap, row, generated)[0]), abs=1e-5)


def test_max_new_tokens_is_cut_to_the_lms_positions_after_the_prefix(cap, emb, monkeypatch, caplog):
    """K + max_new_tokens must fit the LM's context: cut (with a warning when the user asked for more)."""
    uncut = _tokens(cap, emb)
    assert max(len(t) for t in uncut) > 6
    monkeypatch.setattr(cap.model.lm.config, "n_positions", K + 6)  # room for 6 new tokens
    with caplog.at_level("WARNING", logger="prefixcap.caption.captioner"):
        asked = cap.generate(emb, GenerationSettings(max_new_tokens=MAX_NEW)).tokens
    assert [r.getMessage() for r in caplog.records] == [
        f"max_new_tokens={MAX_NEW} does not fit the LM's {K + 6} positions after the {K}-token prefix; using 6"]
    assert max(len(t) for t in asked) == 6
    caplog.clear()
    with caplog.at_level("WARNING", logger="prefixcap.caption.captioner"):
        exact = cap.generate(emb, GenerationSettings(max_new_tokens=6)).tokens  # fits exactly: no cut, no warning
        default = cap.generate(emb, GenerationSettings()).tokens  # the model's default (10) is cut silently
    assert caplog.records == []
    assert asked == exact == default
    assert asked == [t[:6] for t in uncut]  # the same captions, cut at 6 tokens


def test_generation_uses_the_kv_cache(cap, emb):
    """After the prefix, each step feeds the LM one new position (not the whole sequence again)."""
    lengths = []

    def record(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids", args[0] if args else None) if x is None else x
        lengths.append(int(x.shape[1]))

    handle = cap.model.lm.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        cap.generate(emb[:2], GenerationSettings(max_new_tokens=MAX_NEW))
    finally:
        handle.remove()
    assert lengths[0] == K and len(lengths) > 3 and set(lengths[1:]) == {1}, lengths


@pytest.fixture(scope="module")
def cap_t5(tiny_t5) -> Captioner:
    torch.manual_seed(0)
    config = CaptionConfig(language_model=tiny_t5, lm_family="seq2seq",
                           mapping=MappingConfig("mlp", prefix_size=C, prefix_length=K), max_token_length=MAX_NEW)
    model = CaptionModel(config)
    with torch.no_grad():
        for p in model.lm.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    return Captioner(model)


def test_seq2seq_greedy_scores_are_mean_log_prob_of_the_decoder_tokens(cap_t5, emb):
    """T5's sequences start with the decoder start token: the scores must line up with the new tokens."""
    eos = cap_t5.tokenizer.eos_token_id
    lm = cap_t5.model.lm
    out = cap_t5.generate(emb, GenerationSettings(max_new_tokens=MAX_NEW), return_scores=True)
    for row, tokens, score in zip(emb, out.tokens, out.scores):
        generated = tokens + ([eos] if len(tokens) < MAX_NEW else [])
        with torch.no_grad():
            prefix = cap_t5.model.prefix(row[None])
            dec = torch.tensor([[lm.config.decoder_start_token_id, *generated[:-1]]])
            logp = lm(inputs_embeds=prefix, decoder_input_ids=dec).logits[0].float().log_softmax(-1)
        want = torch.stack([logp[i, t] for i, t in enumerate(generated)]).mean()
        assert score == pytest.approx(float(want), abs=1e-4), tokens
