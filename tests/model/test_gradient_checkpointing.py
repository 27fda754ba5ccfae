"""Gradient checkpointing of the LM: same loss and gradients as without it, in all three LM modes, really active."""

from __future__ import annotations

import copy

import pytest
import torch

from prefixcap.model.language_models import load_language_model
from prefixcap.model.mapping import MappingConfig
from prefixcap.model.captioning import CaptionModel, _checkpointed_layers
from prefixcap.model.config import CaptionConfig
from prefixcap.train.cli import parse_config

K = 3


def _model(lm_path: str, family: str, mode: str) -> CaptionModel:
    from prefixcap.model.adapters import resolve_settings

    torch.manual_seed(0)
    lm = load_language_model(lm_path, family)
    cfg = CaptionConfig(clip_model="tiny", language_model=lm_path, lm_family=family, tokenizer=lm_path,
                        mapping=MappingConfig("mlp", prefix_size=16, prefix_length=K), only_prefix=mode == "frozen",
                        lora=resolve_settings(lm, 4, 8.0, 0.1) if mode == "lora" else None)
    return CaptionModel(cfg, lm=lm)


def _loss_and_grads(model: CaptionModel) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    g = torch.Generator().manual_seed(3)
    emb, tokens = torch.randn(4, 16, generator=g), torch.randint(3, 150, (4, 7), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, 5:] = mask[3, 2:] = 0
    calls = []
    # A leaf inside the first layer block: checkpointing replays the block's forward (not its __call__),
    # so the block's own hooks would not see the replay, its submodules' do.
    block = _checkpointed_layers(model.lm)[0]
    leaf = next(m for m in block.modules() if m is not block and not list(m.children()))
    hook = leaf.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout masks in both runs (checkpointing replays the RNG state)
    loss = model(emb, tokens, mask)
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("family_fixture,family", [("tiny_gpt2", "causal"), ("tiny_t5", "seq2seq")])
@pytest.mark.parametrize("mode", ["frozen", "lora", "fine-tuned"])
def test_checkpointing_gives_the_same_loss_and_gradients(mode, family_fixture, family, request):
    plain = _model(request.getfixturevalue(family_fixture), family, mode)
    ckpt = copy.deepcopy(plain)
    ckpt.enable_gradient_checkpointing()
    loss_a, grads_a, calls_a = _loss_and_grads(plain)
    loss_b, grads_b, calls_b = _loss_and_grads(ckpt)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    # The frozen LM gets no weight gradients; the mapper always does; LoRA only on its adapter weights.
    lm_grads = [n for n in grads_a if n.startswith("lm.")]
    assert any(n.startswith("mapper.") for n in grads_a)
    assert {"frozen": not lm_grads, "lora": lm_grads and all("lora_" in n for n in lm_grads),
            "fine-tuned": len(lm_grads) > 10}[mode]
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-7, msg=n)
    # Checkpointing was really on: the block's forward ran again in the backward pass (also with the
    # frozen LM in eval mode, whose dropout stays off).
    assert calls_a == 1 and calls_b == 2
    if mode == "frozen":
        assert not ckpt.lm.training and not any(m.training for m in ckpt.lm.modules()
                                                if isinstance(m, torch.nn.Dropout))


def test_flag_parses(tmp_path):
    cfg = parse_config(["--data_dir", str(tmp_path), "--gradient_checkpointing"])
    assert cfg.gradient_checkpointing is True and parse_config([]).gradient_checkpointing is False
