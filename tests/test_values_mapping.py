"""Mapper outputs pinned against the ClipCap architecture written out independently in the test.

Other mapper tests check parameter counts and shapes; these recompute the output from the
mapper's own weights with plain tensor algebra (CLIPCAP_REFERENCE.md, "The mappers, exactly"),
so a swapped activation, a wrong slice or a mis-split key/value projection changes the numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefixcap.mapping import MappingConfig, MLPMapper, TransformerMapper, build_mapper


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
    b, d, h, L, K = x.shape[0], cfg.lm_dim, cfg.num_heads, cfg.clip_tokens, cfg.prefix_length
    hd = d // h
    clip = (x @ sd["linear.weight"].T + sd["linear.bias"]).reshape(b, L, d)
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
