"""Beam search / several sequences per input: the prefix goes through the LM once per input, not once
per copy, and the decoding is the same as plain `generate` from the whole prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefixcap.caption.captioner import Captioner, _trim_at_eos
from prefixcap.generation import GenerationSettings
from model_helpers import C, K, build_artifact

B = 3  # inputs per batch


def build_captioner(path: Path, clip: str, lm: str, family: str) -> Captioner:
    """Random mapper and LM weights at std 0.5, so that beams and tokens differ between inputs."""
    return Captioner.from_pretrained(build_artifact(path, clip, lm, family))


@pytest.fixture(scope="module")
def gpt2_cap(tmp_path_factory, tiny_clip, tiny_gpt2) -> Captioner:
    return build_captioner(tmp_path_factory.mktemp("beam") / "gpt2", tiny_clip, tiny_gpt2, "causal")


@pytest.fixture(scope="module")
def t5_cap(tmp_path_factory, tiny_clip, tiny_t5) -> Captioner:
    return build_captioner(tmp_path_factory.mktemp("beam") / "t5", tiny_clip, tiny_t5, "seq2seq")


def embeddings(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed))  # (N, C)


@torch.inference_mode()
def plain_generate(cap: Captioner, emb: torch.Tensor, settings: GenerationSettings):
    """What `Captioner.generate` did before: the whole prefix to `generate`, which repeats it per copy."""
    prefix = cap.model.prefix(emb)
    out = cap.model.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                                **cap._generate_kwargs(settings, return_scores=True))
    tokens, _ = _trim_at_eos(out.sequences, cap.eos_token_id)
    return tokens, out


class PositionCounter:
    """Records the (batch, positions) of every call of one module (a transformer block)."""

    def __init__(self, module: torch.nn.Module):
        self.shapes: list[tuple[int, int]] = []
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.shapes.append(tuple(hidden.shape[:2]))

    def __enter__(self) -> PositionCounter:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def positions(self) -> int:
        return sum(b * t for b, t in self.shapes)


@pytest.mark.parametrize("num_beams,num_return_sequences,length_penalty",
                         [(2, 1, 1.0), (3, 3, 1.0), (4, 2, 0.5), (5, 1, 1.0), (5, 5, -1.0)])
def test_beam_search_equals_plain_generate(gpt2_cap, num_beams, num_return_sequences, length_penalty):
    settings = GenerationSettings(num_beams=num_beams, num_return_sequences=num_return_sequences,
                                  length_penalty=length_penalty, max_new_tokens=8)
    emb = embeddings(B, seed=num_beams)
    want_tokens, want = plain_generate(gpt2_cap, emb, settings)
    got = gpt2_cap.generate(emb, settings, return_scores=True)
    assert len(got.tokens) == B * num_return_sequences
    assert got.tokens == want_tokens
    assert len({tuple(t) for t in got.tokens}) > 1  # the inputs decode differently: a real comparison
    # Scores agree to float rounding: the prefix runs through matrices of other shapes than before.
    torch.testing.assert_close(torch.tensor(got.scores), want.sequences_scores, rtol=1e-6, atol=1e-5)


def test_sampling_several_sequences_equals_plain_generate(gpt2_cap):
    settings = GenerationSettings(do_sample=True, num_return_sequences=4, top_k=0, max_new_tokens=8)
    emb = embeddings(B, seed=7)
    torch.manual_seed(3)
    want_tokens, _ = plain_generate(gpt2_cap, emb, settings)
    torch.manual_seed(3)
    got = gpt2_cap.generate(emb, settings)
    assert got.tokens == want_tokens
    assert len({tuple(t) for t in got.tokens}) > 1


@pytest.mark.parametrize("num_beams,num_return_sequences", [(5, 1), (4, 3)])
def test_prefix_runs_once_per_input_not_per_beam(gpt2_cap, num_beams, num_return_sequences):
    settings = GenerationSettings(num_beams=num_beams, num_return_sequences=num_return_sequences, max_new_tokens=6)
    emb = embeddings(B, seed=1)
    block = gpt2_cap.model.lm.transformer.h[0]
    with PositionCounter(block) as before:
        plain_generate(gpt2_cap, emb, settings)
    with PositionCounter(block) as now:
        gpt2_cap.generate(emb, settings)
    n = num_beams
    assert before.shapes[0] == (B * n, K)  # plain generate: the whole prefix once per beam
    # Now: K-1 prefix positions once per input, then only the last one per beam, then the same steps.
    assert now.shapes[:2] == [(B, K - 1), (B * n, 1)]
    assert now.shapes[2:] == before.shapes[1:]
    assert before.positions - now.positions == (n - 1) * B * (K - 1)


@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=5),
                                      GenerationSettings(do_sample=True, max_new_tokens=5)])
def test_one_sequence_per_input_prefills_as_before(gpt2_cap, settings):
    emb = embeddings(B, seed=2)
    with PositionCounter(gpt2_cap.model.lm.transformer.h[0]) as counter:
        gpt2_cap.generate(emb, settings)
    assert counter.shapes[0] == (B, K)  # no extra forward pass: generate's own prefill, unchanged
    assert counter.shapes[1:] == [(B, 1)] * (len(counter.shapes) - 1)


def test_own_cache_keywords_fall_back_to_generates_prefill(gpt2_cap):
    """A `generate` keyword that brings its own cache set-up gets generate's own prefill."""
    settings = GenerationSettings(num_beams=3, max_new_tokens=4)
    emb = embeddings(B, seed=4)
    want_tokens, _ = plain_generate(gpt2_cap, emb, settings)
    with PositionCounter(gpt2_cap.model.lm.transformer.h[0]) as counter:
        got = gpt2_cap.generate(emb, settings, cache_implementation="dynamic")
    assert counter.shapes[0] == (B * 3, K)
    assert got.tokens == want_tokens


def test_seq2seq_encoder_runs_once_per_input(t5_cap):
    """T5's generate encodes the prefix before repeating it per beam, so there is nothing to save."""
    settings = GenerationSettings(num_beams=4, num_return_sequences=2, max_new_tokens=5)
    emb = embeddings(B, seed=5)
    lm = t5_cap.model.lm
    with PositionCounter(lm.encoder.block[0]) as encoder, PositionCounter(lm.decoder.block[0]) as decoder:
        got = t5_cap.generate(emb, settings, return_scores=True)
    assert encoder.shapes == [(B, K)]
    assert decoder.shapes[0] == (B * 4, 1)  # each beam's decoder starts from its one start token
    assert len(got.tokens) == B * 2
