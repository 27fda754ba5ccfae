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

from prefixcap.model.mapping import MappingConfig
from prefixcap.model.captioning import CaptionModel, _needs_full_logits
from prefixcap.model.config import CaptionConfig

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


# --- the config and the model's construction -------------------------------------------------------
def test_config_from_an_older_artifact_without_mapping_or_lora_keys_gets_the_defaults():
    cfg = CaptionConfig.from_dict({"artifact": "prefixcap", "language_model": "gpt2", "only_prefix": True})
    assert cfg.mapping == MappingConfig() and cfg.lora is None and cfg.only_prefix
    assert cfg.lm_mode == "frozen"


def test_config_round_trip_keeps_lora_settings_as_their_type():
    from prefixcap.model.adapters import LoraSettings

    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=["c_attn"])
    cfg = CaptionConfig(language_model="x", mapping=MappingConfig("transformer", prefix_length=5, clip_length=3),
                        lora=lora)
    back = CaptionConfig.from_dict(cfg.to_dict())
    assert isinstance(back.lora, LoraSettings) and back.lora == lora
    assert back == cfg and back.lm_mode == "lora"
    assert CaptionConfig.from_dict(CaptionConfig(language_model="x").to_dict()).lm_mode == "fine-tuned"


def test_config_with_unknown_keys_is_refused_naming_them():
    with pytest.raises(ValueError, match=r"^unknown keys in prefixcap config: \['prefx_length', 'zz'\]$"):
        CaptionConfig.from_dict({"artifact": "prefixcap", "zz": 1, "prefx_length": 10, "language_model": "gpt2"})


def test_lora_with_a_frozen_lm_is_refused():
    from prefixcap.model.adapters import LoraSettings

    config = CaptionConfig(language_model="gpt2", only_prefix=True, lora=LoraSettings(rank=2),
                           mapping=MappingConfig("mlp", prefix_size=C, prefix_length=K))
    with pytest.raises(ValueError, match=r"^LoRA trains adapters inside the LM, so it cannot be combined with a "
                                         r"frozen LM \(only_prefix / --only_prefix\)$"):
        CaptionModel(config, lm=_tiny_gpt2_lm(), tokenizer=object())


def test_hub_keywords_reach_the_lm_and_tokenizer_loaders(monkeypatch):
    import prefixcap.model.captioning as model_module

    seen = {}

    def fake_lm(name, family, **kwargs):
        seen["lm"] = (name, family, kwargs)
        return _tiny_gpt2_lm()

    def fake_tokenizer(name, **kwargs):
        seen["tokenizer"] = (name, kwargs)
        return "tok"

    monkeypatch.setattr(model_module, "load_language_model", fake_lm)
    monkeypatch.setattr(model_module, "load_tokenizer", fake_tokenizer)
    config = CaptionConfig(language_model="org/lm", tokenizer="org/tok",
                           mapping=MappingConfig("mlp", prefix_size=C, prefix_length=K))
    model = CaptionModel(config, revision="abc", token="t")
    assert seen["lm"] == ("org/lm", "causal", {"revision": "abc", "token": "t"})
    assert seen["tokenizer"] == ("org/tok", {"revision": "abc", "token": "t"})
    assert model.tokenizer == "tok" and model.config.mapping.lm_dim == 16  # D read from the LM
    assert model.gradient_checkpointing is False and model.card_info == {}


def test_lora_model_wraps_its_own_lm_and_loads_a_saved_adapter(tmp_path):
    from peft import PeftModel

    from prefixcap.model.adapters import LoraSettings, lora_parameters

    settings = LoraSettings(rank=2, alpha=4.0, dropout=0.0, target_modules=["c_attn"])
    config = CaptionConfig(language_model="gpt2", lora=settings,
                           mapping=MappingConfig("mlp", prefix_size=C, prefix_length=K))
    torch.manual_seed(0)
    lm = _tiny_gpt2_lm()
    model = CaptionModel(config, lm=lm, tokenizer=object())
    wrapper = model.peft_wrapper
    assert isinstance(wrapper, PeftModel) and wrapper.get_base_model() is model.lm is lm
    names = [n for n, _ in model.lm.named_parameters() if "lora_" in n]
    assert len(names) == 2 * 2 and all(".c_attn." in n for n in names)  # A and B in each of the 2 layers
    assert [p.shape[0] for n, p in model.lm.named_parameters() if "lora_A" in n] == [2, 2]  # the rank
    with torch.no_grad():
        for p in lora_parameters(model.lm):
            p.normal_(0, 0.1)
    wrapper.save_pretrained(tmp_path / "adapter")
    # A second model built from the saved adapter folder holds the same adapter weights.
    torch.manual_seed(0)
    again = CaptionModel(config, lm=_tiny_gpt2_lm(), tokenizer=object(), adapter_path=tmp_path / "adapter")
    for a, b in zip(lora_parameters(model.lm), lora_parameters(again.lm), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(float(p.detach().abs().sum()) > 0 for p in lora_parameters(again.lm))


def test_frozen_lm_with_checkpointing_flags_only_the_layer_blocks_in_training():
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = _model("gpt2")
    model.set_only_prefix(True)
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing is True
    blocks = [m for m in model.lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(blocks) == 2
    model.train()
    assert model.mapper.training and all(b.training is True for b in blocks)
    dropouts = [m for m in model.lm.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not any(d.training for d in dropouts)  # a frozen LM never runs dropout
    assert not model.lm.training
    model.eval()
    assert all(b.training is False for b in blocks) and not model.mapper.training
    # Without checkpointing, a frozen LM's blocks stay in eval mode while training the mapper.
    plain = _model("gpt2")
    plain.set_only_prefix(True)
    plain.train()
    assert not any(m.training for m in plain.lm.modules())


def test_prefix_runs_the_mapper_in_its_dtype_and_returns_the_lms():
    model = _model("gpt2")
    model.mapper.double()  # e.g. a mapper kept in full precision beside a half-precision LM
    emb = torch.randn(2, C)  # float32 embeddings, as stored
    out = model.prefix(emb)
    assert out.dtype == torch.float32  # the LM's embedding dtype
    with torch.no_grad():
        want = model.mapper(emb.double()).float()
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
    model.lm.double()
    assert model.prefix(emb).dtype == torch.float64


def _lm_trainable(model: CaptionModel) -> set[str]:
    return {n for n, p in model.lm.named_parameters() if p.requires_grad}


def test_only_the_adapter_trains_in_the_lm_with_lora_and_nothing_when_frozen():
    from prefixcap.model.adapters import LoraSettings

    config = CaptionConfig(language_model="gpt2", lora=LoraSettings(rank=2, alpha=4.0, dropout=0.0,
                                                                   target_modules=["c_attn", "c_proj"]),
                           mapping=MappingConfig("mlp", prefix_size=C, prefix_length=K))
    model = CaptionModel(config, lm=_tiny_gpt2_lm(), tokenizer=object())
    lora_names = {n for n, _ in model.lm.named_parameters() if "lora_" in n}
    assert len(lora_names) == 2 * 2 * 3  # A, B in c_attn, attn.c_proj and mlp.c_proj of 2 layers
    assert _lm_trainable(model) == lora_names
    assert all(p.requires_grad for p in model.mapper.parameters())
    model.set_only_prefix(True)
    assert _lm_trainable(model) == set() and not model.lm.training
    model.set_only_prefix(False)  # back to LoRA training: the adapters again, never the base weights
    assert _lm_trainable(model) == lora_names
    tuned = _model("gpt2")
    assert _lm_trainable(tuned) == {n for n, _ in tuned.lm.named_parameters()}
    tuned.set_only_prefix(True)
    assert _lm_trainable(tuned) == set() and tuned.config.only_prefix
