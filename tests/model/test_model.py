"""The mapping networks and the caption model: sizes, the loss mask, frozen LM, save/load, seq2seq."""

from __future__ import annotations

import pytest
import torch

from prefixcap.model.language_models import load_language_model, load_tokenizer
from prefixcap.model.mapping import MappingConfig, build_mapper
from prefixcap.model import CaptionConfig, CaptionModel


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_mlp_mapper_has_clipcap_parameter_count():
    mapper = build_mapper(MappingConfig("mlp", prefix_size=512, lm_dim=768, prefix_length=10))
    assert _count(mapper) == 31_468_800
    assert mapper(torch.zeros(2, 512)).shape == (2, 10, 768)


def test_transformer_mapper_size_and_shape():
    mapper = build_mapper(MappingConfig("transformer", prefix_size=512, lm_dim=768, prefix_length=10,
                                        clip_length=10, num_layers=8, num_heads=8))
    # Linear 512->10*768, a (10, 768) constant, 8 pre-LN layers (bias-free q/kv, biased out, 2x MLP).
    assert _count(mapper) == 41_745_408
    assert round(_count(mapper) / 1e6, 1) == 41.7
    small = build_mapper(MappingConfig("transformer", prefix_size=16, lm_dim=32, prefix_length=4, clip_length=3,
                                       num_layers=2, num_heads=2))
    assert small(torch.randn(5, 16)).shape == (5, 4, 32)


def test_unknown_mapping_type_is_refused():
    with pytest.raises(ValueError, match="mlp, transformer"):
        build_mapper(MappingConfig("lstm"))


def _model(lm_path: str, family: str, only_prefix: bool, mapping_type: str = "mlp", k: int = 4,
           normalize: bool = False) -> CaptionModel:
    torch.manual_seed(0)
    cfg = CaptionConfig(clip_model="tiny", language_model=lm_path, lm_family=family, tokenizer=lm_path,
                        mapping=MappingConfig(mapping_type, prefix_size=16, prefix_length=k, clip_length=k,
                                              num_layers=2, num_heads=2),
                        normalize_prefix=normalize, only_prefix=only_prefix)
    return CaptionModel(cfg)


def _padded(tokenizer, captions: list[str], pad_id: int, eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
           for c in captions]
    t = max(map(len, ids))
    tokens = torch.full((len(ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), t, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return tokens, mask


def _reference_causal_loss(model: CaptionModel, emb, tokens, mask, exclude_id: int | None = None) -> torch.Tensor:
    """Full-logits loss computed by hand: position K-1+i predicts caption token i."""
    prefix = model.prefix(emb)  # (B, K, D)
    k = prefix.shape[1]
    inputs = torch.cat((prefix, model.lm.get_input_embeddings()(tokens)), dim=1)
    attn = torch.cat((torch.ones(tokens.shape[0], k, dtype=mask.dtype), mask), dim=1)
    logp = model.lm(inputs_embeds=inputs, attention_mask=attn).logits.log_softmax(-1)  # (B, K+T, V)
    terms = []
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            if mask[b, i] and (exclude_id is None or tokens[b, i] != exclude_id):
                terms.append(-logp[b, k - 1 + i, tokens[b, i]])
    return torch.stack(terms).mean()


def test_causal_loss_masks_prefix_and_padding_but_keeps_exclamation(tiny_gpt2):
    model = _model(tiny_gpt2, "causal", only_prefix=True).eval()
    tok = model.tokenizer
    bang = tok.convert_tokens_to_ids("!")
    # Padding deliberately uses the "!" id: only the mask (not the id) may decide what counts.
    tokens, mask = _padded(tok, ["a red circle!", "one big blue star on the left.", "a square"], pad_id=bang)
    assert (tokens[mask.bool()] == bang).any() and (tokens[~mask.bool()] == bang).any()
    emb = torch.randn(3, 16)
    with torch.no_grad():
        loss = model(emb, tokens, mask)
        ref = _reference_causal_loss(model, emb, tokens, mask)
        by_id = _reference_causal_loss(model, emb, tokens, mask, exclude_id=bang)
        other_pad = model(emb, tokens.masked_fill(mask == 0, 7), mask)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_pad, loss, rtol=1e-6, atol=1e-6)
    assert abs(float(by_id) - float(loss)) > 1e-4  # the real "!" is counted


def test_seq2seq_loss_matches_reference_and_encoder_sees_only_prefix(tiny_t5):
    model = _model(tiny_t5, "seq2seq", only_prefix=False, k=3).eval()
    tok = model.tokenizer
    tokens, mask = _padded(tok, ["a red circle!", "one big blue star on the left."], pad_id=5)
    emb = torch.randn(2, 16)
    seen = []
    handle = model.lm.get_encoder().register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args, dict(kwargs))), with_kwargs=True)
    try:
        with torch.no_grad():
            loss = model(emb, tokens, mask)
    finally:
        handle.remove()
    assert len(seen) == 1
    args, kwargs = seen[0]
    assert kwargs.get("input_ids") is None and not any(isinstance(a, torch.Tensor) for a in args)
    prefix = model.prefix(emb)
    torch.testing.assert_close(kwargs["inputs_embeds"], prefix)  # exactly the (B, K, D) prefix, no caption
    # Hand-computed: decoder input = start token + caption shifted right; loss over real tokens.
    start = model.lm.config.decoder_start_token_id
    dec_in = torch.cat((torch.full((2, 1), start), tokens[:, :-1]), dim=1)
    with torch.no_grad():
        logp = model.lm(inputs_embeds=prefix, attention_mask=torch.ones(2, 3, dtype=torch.long),
                        decoder_input_ids=dec_in).logits.log_softmax(-1)
    ref = -logp.gather(-1, tokens[..., None])[..., 0][mask.bool()].mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    # The encoder's output does not depend on the caption at all.
    with torch.no_grad():
        enc1 = model.lm.get_encoder()(inputs_embeds=prefix).last_hidden_state
    other = tokens.clone()
    other[0, 0] = (other[0, 0] + 1) % len(tok)
    with torch.no_grad():
        assert not torch.equal(model(emb, other, mask), loss)
        enc2 = model.lm.get_encoder()(inputs_embeds=model.prefix(emb)).last_hidden_state
    torch.testing.assert_close(enc1, enc2)


@pytest.mark.parametrize("family_fixture", ["tiny_gpt2", "tiny_t5"])
def test_frozen_lm_gets_no_weight_gradients(family_fixture, request):
    path = request.getfixturevalue(family_fixture)
    family = "causal" if family_fixture == "tiny_gpt2" else "seq2seq"
    model = _model(path, family, only_prefix=True, mapping_type="transformer").train()
    assert not model.lm.training  # frozen LM stays in eval mode (no dropout)
    tokens, mask = _padded(model.tokenizer, ["a red circle", "a blue star on the right"], pad_id=0)
    model(torch.randn(2, 16), tokens, mask).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None for p in model.mapper.parameters())

    tuned = _model(path, family, only_prefix=False).train()
    assert tuned.lm.training
    tuned(torch.randn(2, 16), tokens, mask).backward()
    assert tuned.lm.get_input_embeddings().weight.grad is not None


def test_normalize_prefix_ignores_embedding_scale(tiny_gpt2):
    model = _model(tiny_gpt2, "causal", only_prefix=True, normalize=True).eval()
    tokens, mask = _padded(model.tokenizer, ["a red circle"], pad_id=0)
    emb = torch.randn(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(emb, tokens, mask), model(emb * 7.5, tokens, mask))


@pytest.mark.parametrize("family_fixture,only_prefix,mapping_type", [
    ("tiny_gpt2", True, "mlp"), ("tiny_gpt2", False, "transformer"), ("tiny_t5", False, "mlp"),
    ("tiny_t5", True, "transformer")])
def test_save_load_gives_identical_logits(tmp_path, family_fixture, only_prefix, mapping_type, request):
    path = request.getfixturevalue(family_fixture)
    family = "causal" if family_fixture == "tiny_gpt2" else "seq2seq"
    model = _model(path, family, only_prefix=only_prefix, mapping_type=mapping_type)
    if not only_prefix:  # a fine-tuned LM differs from the one on disk: it must be stored
        with torch.no_grad():
            model.lm.get_input_embeddings().weight.add_(0.5)
    model.eval()
    out = model.save_pretrained(tmp_path / "artifact")
    assert (out / "lm").is_dir() == (not only_prefix)
    loaded = CaptionModel.from_pretrained(out)
    assert loaded.config.to_dict() == model.config.to_dict()
    tokens, mask = _padded(model.tokenizer, ["a red circle!", "a star"], pad_id=0)
    emb = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded.prefix(emb), model.prefix(emb))
        assert torch.equal(loaded(emb, tokens, mask), model(emb, tokens, mask))
        if family == "causal":
            inputs = torch.cat((model.prefix(emb), model.lm.get_input_embeddings()(tokens)), 1)
            inputs2 = torch.cat((loaded.prefix(emb), loaded.lm.get_input_embeddings()(tokens)), 1)
            assert torch.equal(loaded.lm(inputs_embeds=inputs2).logits, model.lm(inputs_embeds=inputs).logits)


def test_lm_width_comes_from_the_lm(tiny_gpt2):
    lm = load_language_model(tiny_gpt2, "causal")
    cfg = CaptionConfig(language_model=tiny_gpt2, mapping=MappingConfig("mlp", prefix_size=16, lm_dim=999,
                                                                        prefix_length=2))
    model = CaptionModel(cfg, lm=lm, tokenizer=load_tokenizer(tiny_gpt2))
    assert model.config.mapping.lm_dim == 32
    assert model.prefix(torch.randn(1, 16)).shape == (1, 2, 32)
