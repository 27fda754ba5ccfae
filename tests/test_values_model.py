"""The caption loss pinned against a hand-computed shifted cross-entropy, on both code paths.

LMs that post-process their logits inside `forward` (Gemma-2's final_logit_softcapping, Cohere's
logit_scale) take the full-logits branch of `_causal_loss`; the others the hidden-state branch.
Each is checked against a reference that runs the LM on every caption separately (no padding at
all) and takes -log p(token i | position K-1+i) by hand.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (  # imported at collection, so mutmut's forked test runs start warm
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from prefixcap.mapping import MappingConfig
from prefixcap.model import CaptionConfig, CaptionModel, _needs_full_logits

K = 3
C = 6


def _tiny_gemma2():
    cfg = Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                       final_logit_softcapping=2.0, attn_logit_softcapping=50.0, sliding_window=16,
                       attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Gemma2ForCausalLM(cfg)


def _tiny_cohere():
    cfg = CohereConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       logit_scale=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return CohereForCausalLM(cfg)


def _tiny_gpt2_lm():
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=64))


LMS = {"gemma2": _tiny_gemma2, "cohere": _tiny_cohere, "gpt2": _tiny_gpt2_lm}


def _model(lm_name: str) -> CaptionModel:
    torch.manual_seed(0)
    lm = LMS[lm_name]()
    with torch.no_grad():  # large logits, so that soft-capping / scaling changes the loss a lot
        for p in lm.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.6)
    config = CaptionConfig(language_model=lm_name, mapping=MappingConfig("mlp", prefix_size=C, prefix_length=K))
    return CaptionModel(config, lm=lm, tokenizer=object()).eval()


def _reference_loss(model: CaptionModel, emb, tokens, mask) -> torch.Tensor:
    """Mean over real tokens of -log softmax(LM logits at K-1+i)[token i], one caption at a time."""
    terms = []
    for b in range(tokens.shape[0]):
        n = int(mask[b].sum())
        real = tokens[b, :n]
        prefix = model.prefix(emb[b:b + 1])  # (1, K, D)
        inputs = torch.cat((prefix, model.lm.get_input_embeddings()(real)[None]), dim=1)  # (1, K+n, D)
        logits = model.lm(inputs_embeds=inputs, use_cache=False).logits[0]  # (K+n, V), capped/scaled by the LM
        logp = logits.float().log_softmax(-1)
        terms += [-logp[K - 1 + i, real[i]] for i in range(n)]
    return torch.stack(terms).mean()


def _batch():
    tokens = torch.tensor([[5, 9, 13, 2, 0, 0], [7, 11, 2, 0, 0, 0], [3, 4, 6, 8, 10, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    tokens = tokens.masked_fill(mask == 0, 17)  # padding id must not matter
    return torch.randn(3, C), tokens, mask


@pytest.mark.parametrize("lm_name,full", [("gemma2", True), ("cohere", True), ("gpt2", False)])
def test_causal_loss_equals_hand_computed_shifted_cross_entropy(lm_name, full):
    model = _model(lm_name)
    assert _needs_full_logits(model.lm) is full
    torch.manual_seed(1)
    emb, tokens, mask = _batch()
    with torch.no_grad():
        loss = model(emb, tokens, mask)
        ref = _reference_loss(model, emb, tokens, mask)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lm_name", ["gemma2", "cohere"])
def test_soft_capping_changes_the_loss_so_the_branch_matters(lm_name):
    """The hidden-state shortcut (no capping/scaling) gives another loss, and a one-position shift too."""
    model = _model(lm_name)
    torch.manual_seed(1)
    emb, tokens, mask = _batch()
    with torch.no_grad():
        loss = model(emb, tokens, mask)
        prefix = model.prefix(emb)
        inputs = torch.cat((prefix, model.lm.get_input_embeddings()(tokens)), dim=1)
        attn = torch.cat((torch.ones(3, K, dtype=mask.dtype), mask), dim=1)
        hidden = model.lm.base_model(inputs_embeds=inputs, attention_mask=attn).last_hidden_state
        raw = model.lm.get_output_embeddings()(hidden)  # (B, K+T, V) without the LM's post-processing
        t = tokens.shape[1]
        sel = mask.bool()
        uncapped = torch.nn.functional.cross_entropy(raw[:, K - 1:K - 1 + t][sel], tokens[sel])
        full = model.lm(inputs_embeds=inputs, attention_mask=attn).logits
        shifted = torch.nn.functional.cross_entropy(full[:, K:K + t][sel], tokens[sel])
    assert abs(float(uncapped) - float(loss)) > 0.05
    assert abs(float(shifted) - float(loss)) > 0.05


def test_loss_gradient_reaches_the_mapper_on_the_full_logits_branch():
    model = _model("gemma2")
    model.train()
    torch.manual_seed(1)
    emb, tokens, mask = _batch()
    model(emb, tokens, mask).backward()
    grads = [p.grad for p in model.mapper.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
