"""Mapper outputs pinned against the ClipCap architecture written out independently in the test.

Other mapper tests check parameter counts and shapes; these recompute the output from the
mapper's own weights with plain tensor algebra (CLIPCAP_REFERENCE.md, "The mappers, exactly"),
so a swapped activation, a wrong slice or a mis-split key/value projection changes the numbers.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from prefixcap.model.mapping import (MAPPERS, MappingConfig, MLPMapper, TokenProjector, TokenTransformerMapper,
                               TransformerMapper, build_mapper, with_token_input)


def _mlp_reference(sd: dict[str, torch.Tensor], x: torch.Tensor, k: int, d: int) -> torch.Tensor:
    (w1, b1), (w2, b2) = [(sd[f"model.{i}.weight"], sd[f"model.{i}.bias"]) for i in (0, 2)]
    hidden = torch.tanh(x @ w1.T + b1)  # (B, D*K/2)
    return (hidden @ w2.T + b2).reshape(x.shape[0], k, d)  # (B, K, D)


def test_mlp_mapper_is_linear_tanh_linear():
    torch.manual_seed(0)
    cfg = MappingConfig("mlp", prefix_size=6, lm_dim=4, prefix_length=3)
    mapper = MLPMapper(cfg)
    sd = mapper.state_dict()
    assert sd["model.0.weight"].shape == (4 * 3 // 2, 6) and sd["model.2.weight"].shape == (4 * 3, 4 * 3 // 2)
    x = 3 * torch.randn(5, 6)  # large inputs: tanh saturates, ReLU/identity would differ a lot
    got = mapper(x)
    torch.testing.assert_close(got, _mlp_reference(sd, x, 3, 4), rtol=1e-6, atol=1e-6)
    # The reference is sensitive: the same weights with ReLU give other numbers.
    relu = (torch.relu(x @ sd["model.0.weight"].T + sd["model.0.bias"]) @ sd["model.2.weight"].T
            + sd["model.2.bias"]).reshape(5, 3, 4)
    assert (got - relu).abs().max() > 0.1


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _transformer_reference(sd: dict[str, torch.Tensor], x: torch.Tensor, cfg: MappingConfig) -> torch.Tensor:
    """ClipCap's TransformerMapper from the reference description, on the mapper's state dict."""
    clip = (x @ sd["linear.weight"].T + sd["linear.bias"]).reshape(x.shape[0], cfg.clip_tokens, cfg.lm_dim)
    return _layers_reference(sd, clip, cfg)


def _layers_reference(sd: dict[str, torch.Tensor], clip: torch.Tensor, cfg: MappingConfig) -> torch.Tensor:
    """The mapper's layers on (B, L, D) clip tokens followed by the K learned queries; the last K outputs."""
    b, L, d = clip.shape
    h, K = cfg.num_heads, cfg.prefix_length
    hd = d // h
    seq = torch.cat([clip, sd["prefix_const"].expand(b, K, d)], dim=1)  # clip tokens, then the queries
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        y = _layer_norm(seq, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        q = (y @ sd[p + "attn.to_queries.weight"].T).reshape(b, L + K, h, hd)
        kv = y @ sd[p + "attn.to_keys_values.weight"].T  # (B, N, 2D): first D keys, then D values
        keys, values = kv[..., :d].reshape(b, L + K, h, hd), kv[..., d:].reshape(b, L + K, h, hd)
        att = torch.einsum("bnhc,bmhc->bhnm", q, keys) / math.sqrt(hd)
        att = att.softmax(dim=-1)  # over keys, no mask
        out = torch.einsum("bhnm,bmhc->bnhc", att, values).reshape(b, L + K, d)
        seq = seq + out @ sd[p + "attn.project.weight"].T + sd[p + "attn.project.bias"]
        y = _layer_norm(seq, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        y = torch.relu(y @ sd[p + "mlp.0.weight"].T + sd[p + "mlp.0.bias"])
        seq = seq + y @ sd[p + "mlp.2.weight"].T + sd[p + "mlp.2.bias"]
    return seq[:, L:]  # the last K positions


@pytest.mark.parametrize("clip_length,prefix_length", [(3, 5), (6, 2)])
def test_transformer_mapper_matches_the_architecture_written_out(clip_length, prefix_length):
    torch.manual_seed(1)
    cfg = MappingConfig("transformer", prefix_size=7, lm_dim=8, prefix_length=prefix_length,
                        clip_length=clip_length, num_layers=2, num_heads=2)
    mapper = build_mapper(cfg).double()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so none of them can be dropped unseen
        for name, p in mapper.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)
    sd = {k: v.detach() for k, v in mapper.state_dict().items()}
    assert sd["prefix_const"].shape == (prefix_length, 8)
    assert sd["linear.weight"].shape == (clip_length * 8, 7)
    x = torch.randn(3, 7, dtype=torch.float64)
    got = mapper(x)
    assert got.shape == (3, prefix_length, 8)
    torch.testing.assert_close(got, _transformer_reference(sd, x, cfg), rtol=1e-9, atol=1e-9)


def test_transformer_output_depends_on_the_learned_queries_and_is_the_last_k():
    torch.manual_seed(2)
    cfg = MappingConfig("transformer", prefix_size=7, lm_dim=8, prefix_length=4, clip_length=3,
                        num_layers=1, num_heads=2)
    mapper = TransformerMapper(cfg).double()
    x = torch.randn(2, 7, dtype=torch.float64)
    before = mapper(x)
    # Each output position i is the layer's result at query i: change only query 2 and see output 2 move most.
    with torch.no_grad():
        mapper.prefix_const[2] += 5.0
    after = mapper(x)
    delta = (after - before).abs().amax(dim=(0, 2))  # (K,)
    assert delta[2] > 1.0 and int(delta.argmax()) == 2
    # The first K positions would be clip tokens 0..2 plus query 0: their change is not where query 2 is.
    sd = {k: v.detach() for k, v in mapper.state_dict().items()}
    torch.testing.assert_close(after, _transformer_reference(sd, x, cfg), rtol=1e-9, atol=1e-9)


def test_transformer_batch_rows_are_independent():
    torch.manual_seed(3)
    cfg = MappingConfig("transformer", prefix_size=5, lm_dim=8, prefix_length=2, clip_length=3,
                        num_layers=1, num_heads=4)
    mapper = TransformerMapper(cfg).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    together = mapper(x)
    for i in range(4):
        torch.testing.assert_close(together[i:i + 1], mapper(x[i:i + 1]), rtol=1e-12, atol=1e-12)


def test_width_not_divisible_by_heads_is_refused_with_both_numbers():
    cfg = MappingConfig("transformer", prefix_size=4, lm_dim=10, prefix_length=2, num_layers=1, num_heads=3)
    with pytest.raises(ValueError, match=r"^LM width 10 is not divisible by num_heads=3$"):
        build_mapper(cfg)


def _randomise_norms_and_biases(mapper: torch.nn.Module) -> None:
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so none of them can be dropped unseen
        for name, p in mapper.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)


def test_token_transformer_mapper_matches_the_architecture_written_out():
    """Patch tokens: Linear(C, D) on each token + a learned position per token, then ClipCap's layers."""
    torch.manual_seed(4)
    cfg = MappingConfig("transformer_tokens", prefix_size=6, lm_dim=8, prefix_length=3, num_layers=2,
                        num_heads=2, num_tokens=5, patch_pool=2)
    mapper = build_mapper(cfg).double()
    assert isinstance(mapper, TokenTransformerMapper) and mapper.cfg == cfg
    _randomise_norms_and_biases(mapper)
    with torch.no_grad():
        mapper.positions.normal_(0, 1.0)  # large enough that dropping them changes the output visibly
    sd = {k: v.detach() for k, v in mapper.state_dict().items()}
    assert sd["linear.weight"].shape == (8, 6) and sd["positions"].shape == (5, 8)
    assert sd["prefix_const"].shape == (3, 8)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    got = mapper(x)
    assert got.shape == (2, 3, 8)
    clip = x @ sd["linear.weight"].T + sd["linear.bias"] + sd["positions"]  # (B, N, D)
    torch.testing.assert_close(got, _layers_reference(sd, clip, cfg), rtol=1e-9, atol=1e-9)
    # The positions matter: the tokens in another order give another prefix (no attention symmetry).
    assert (mapper(x.flip(1)) - got).abs().max() > 1e-3


def test_token_mapper_positions_start_small_and_trainable():
    torch.manual_seed(5)
    mapper = TokenTransformerMapper(MappingConfig("transformer_tokens", prefix_size=4, lm_dim=8, prefix_length=2,
                                                  num_layers=1, num_heads=2, num_tokens=50))
    std = float(mapper.positions.detach().std())
    assert 0.01 < std < 0.04, std  # normal(0, 0.02): a small start the LM's scale does not drown
    assert mapper.positions.requires_grad


def test_projector_is_linear_gelu_linear_per_token():
    torch.manual_seed(6)
    cfg = MappingConfig("projector", prefix_size=6, lm_dim=4, prefix_length=3, num_tokens=3)
    mapper = build_mapper(cfg).double()
    assert isinstance(mapper, TokenProjector)
    sd = {k: v.detach() for k, v in mapper.state_dict().items()}
    assert sd["model.0.weight"].shape == (4, 6) and sd["model.2.weight"].shape == (4, 4)
    x = 2 * torch.randn(2, 3, 6, dtype=torch.float64)
    hidden = torch.nn.functional.gelu(x @ sd["model.0.weight"].T + sd["model.0.bias"])  # exact (erf) GELU
    want = hidden @ sd["model.2.weight"].T + sd["model.2.bias"]
    got = mapper(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    tanh_gelu = torch.nn.functional.gelu(x @ sd["model.0.weight"].T + sd["model.0.bias"], approximate="tanh")
    assert (got - (tanh_gelu @ sd["model.2.weight"].T + sd["model.2.bias"])).abs().max() > 1e-6


def test_projector_needs_as_many_prefix_positions_as_tokens():
    with pytest.raises(ValueError, match=r"^the projector's prefix length is its number of tokens: "
                                         r"prefix_length 4 != num_tokens 3$"):
        TokenProjector(MappingConfig("projector", prefix_size=6, lm_dim=4, prefix_length=4, num_tokens=3))


@pytest.mark.parametrize("mapping_type", ["transformer_tokens", "projector"])
@pytest.mark.parametrize("num_tokens", [None, 0])
def test_token_mappers_need_num_tokens(mapping_type, num_tokens):
    cfg = MappingConfig(mapping_type, prefix_size=6, lm_dim=4, prefix_length=3, num_layers=1, num_heads=2,
                        num_tokens=num_tokens)
    with pytest.raises(ValueError, match=rf"^mapping_type '{mapping_type}' takes patch tokens: num_tokens must be "
                                         r"set \(from a dataset preprocessed with --store_patch_tokens\)$"):
        build_mapper(cfg)


@pytest.mark.parametrize("mapping_type", ["transformer_tokens", "projector"])
def test_token_mappers_take_a_single_token(mapping_type):
    """N = 1 (the CLS token alone, e.g. a 1x1 pooled grid dropped) is a valid, if pointless, input."""
    k = 1 if mapping_type == "projector" else 2
    mapper = build_mapper(MappingConfig(mapping_type, prefix_size=6, lm_dim=4, prefix_length=k, num_layers=1,
                                        num_heads=2, num_tokens=1))
    assert mapper(torch.randn(3, 1, 6)).shape == (3, k, 4)


@pytest.mark.parametrize("mapping_type", ["transformer_tokens", "projector"])
@pytest.mark.parametrize("shape", [(2, 6), (2, 4, 6), (2, 3, 5), (1, 2, 3, 6)])
def test_token_mappers_refuse_inputs_of_the_wrong_shape(mapping_type, shape):
    cfg = MappingConfig(mapping_type, prefix_size=6, lm_dim=4, prefix_length=3, num_layers=1, num_heads=2,
                        num_tokens=3)
    mapper = build_mapper(cfg)
    mapper(torch.randn(2, 3, 6))  # the right shape passes
    with pytest.raises(ValueError, match=rf"^mapping_type '{mapping_type}' expects patch tokens of shape "
                                         rf"\(B, 3, 6\), got {re.escape(str(shape))}$"):
        mapper(torch.randn(*shape))


def test_build_mapper_names_the_known_types():
    assert set(MAPPERS) == {"mlp", "transformer", "transformer_tokens", "projector"}
    with pytest.raises(ValueError, match=r"^unknown mapping_type 'mpl'; expected one of "
                                         r"mlp, transformer, transformer_tokens, projector$"):
        build_mapper(MappingConfig("mpl"))


def test_mapping_config_properties():
    assert MappingConfig("transformer", prefix_length=10).clip_tokens == 10  # L defaults to K
    assert MappingConfig("transformer", prefix_length=10, clip_length=4).clip_tokens == 4
    pooled = MappingConfig("mlp", prefix_size=512)
    assert not pooled.takes_tokens and pooled.input_shape == (512,)
    tokens = MappingConfig("transformer_tokens", prefix_size=512, num_tokens=17)
    assert tokens.takes_tokens and tokens.input_shape == (17, 512)
    assert MappingConfig("projector", prefix_size=8).input_shape == (0, 8)  # not yet filled from a manifest
    # The defaults are ClipCap's: C 512, D 768, K 10, 8 layers, 8 heads, MLP ratio 2.
    d = MappingConfig()
    assert (d.mapping_type, d.prefix_size, d.lm_dim, d.prefix_length, d.clip_length, d.num_layers, d.num_heads,
            d.mlp_ratio, d.num_tokens, d.patch_pool) == ("mlp", 512, 768, 10, None, 8, 8, 2.0, None, 1)


def test_with_token_input_fills_tokens_from_the_manifest_record():
    record = {"num_tokens": 17, "pool": 2}
    pooled = MappingConfig("mlp", prefix_length=10)
    assert with_token_input(pooled, record, "x") is pooled
    assert with_token_input(pooled, None, "x") is pooled
    tokens = with_token_input(MappingConfig("transformer_tokens", prefix_length=10), record, "x")
    assert (tokens.num_tokens, tokens.patch_pool, tokens.prefix_length) == (17, 2, 10)
    proj = with_token_input(MappingConfig("projector", prefix_length=10, lm_dim=32), record, "x")
    assert (proj.num_tokens, proj.patch_pool, proj.prefix_length, proj.lm_dim) == (17, 2, 17, 32)
    for empty in (None, {}):
        with pytest.raises(ValueError, match=r"^--mapping_type projector takes patch tokens, but data/ holds only "
                                             r"pooled embeddings; preprocess it again with --store_patch_tokens$"):
            with_token_input(MappingConfig("projector"), empty, "data/")
