"""oneDNN-prepacked linear layers (model/packing.py): the same function, and the same tokens as the plain
layers for every decoding mode, on GPT-2 (Conv1D), T5 (Linear) and a LoRA model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefixcap.caption.captioner import Captioner
from prefixcap.generation import GenerationSettings
from prefixcap.model import CaptionConfig, CaptionModel
from prefixcap.model.adapters import LoraSettings
from prefixcap.model.mapping import MappingConfig
from prefixcap.model.packing import PackedLinear, pack_linear_layers, packing_available
from model_helpers import C, build_artifact

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN")

def _plain_linears(model: nn.Module) -> int:
    return sum(type(m) in (nn.Linear, Conv1D) for m in model.modules())


def _packed(model: nn.Module) -> int:
    return sum(isinstance(m, PackedLinear) for m in model.modules())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_clip, tiny_gpt2, tiny_t5) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packing")
    return {"gpt2": build_artifact(root / "gpt2", tiny_clip, tiny_gpt2, "causal"),
            "t5": build_artifact(root / "t5", tiny_clip, tiny_t5, "seq2seq")}


@pytest.mark.parametrize("conv1d", [False, True])
def test_packed_linear_computes_the_layer(conv1d):
    torch.manual_seed(1)
    layer = Conv1D(24, 16) if conv1d else nn.Linear(16, 24)  # Conv1D(nf=out, nx=in)
    with torch.no_grad():
        layer.bias.normal_()
    holder = nn.Sequential(layer)
    assert pack_linear_layers(holder) == 1 and isinstance(holder[0], PackedLinear)
    for shape in [(1, 16), (5, 16), (2, 3, 16)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(holder(x), layer(x), rtol=1e-5, atol=1e-5)
    strided = torch.randn(4, 7, 16)[:, -1:, :]  # what generate feeds the head at the first step
    torch.testing.assert_close(holder(strided), layer(strided), rtol=1e-5, atol=1e-5)


def test_fused_gelu_is_gelu_of_the_layer():
    torch.manual_seed(2)
    layer = nn.Linear(16, 64)
    holder = nn.Sequential(layer)
    pack_linear_layers(holder)
    holder[0].set_activation("gelu_tanh")
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(holder(x), nn.functional.gelu(layer(x), approximate="tanh"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        holder[0].set_activation("relu")


def test_from_pretrained_packs_every_linear_of_the_lm(artifacts):
    plain = Captioner.from_pretrained(artifacts["gpt2"], pack_weights=False)
    packed = Captioner.from_pretrained(artifacts["gpt2"])
    n = _plain_linears(plain.model.lm)
    assert n > 0 and _packed(plain.model.lm) == 0
    assert _packed(packed.model.lm) == n and _plain_linears(packed.model.lm) == 0
    mlps = [m for m in packed.model.lm.modules() if hasattr(m, "c_fc")]  # GPT-2's MLPs: GELU moved into c_fc
    assert mlps and all(m.c_fc.activation == "gelu_tanh" and isinstance(m.act, nn.Identity) for m in mlps)
    # The input embedding is untouched (the head was a tied copy of it).
    torch.testing.assert_close(packed.model.lm.get_input_embeddings().weight,
                               plain.model.lm.get_input_embeddings().weight)


def test_a_model_built_for_training_is_never_packed(tiny_clip, tiny_gpt2):
    """Validation during training decodes through Captioner(model): packing would freeze a stale copy."""
    config = CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                           mapping=MappingConfig(mapping_type="mlp", prefix_size=C, prefix_length=4))
    cap = Captioner(CaptionModel(config))
    assert _packed(cap.model) == 0


SETTINGS = {
    "greedy": GenerationSettings(max_new_tokens=12),
    "beam": GenerationSettings(num_beams=4, num_return_sequences=2, max_new_tokens=12),
    "penalties": GenerationSettings(num_beams=3, repetition_penalty=1.3, length_penalty=0.5, max_new_tokens=12),
}


@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("mode", sorted(SETTINGS))
def test_same_tokens_as_the_plain_layers(artifacts, family, mode):
    plain = Captioner.from_pretrained(artifacts[family], pack_weights=False)
    packed = Captioner.from_pretrained(artifacts[family])
    emb = torch.randn(6, C, generator=torch.Generator().manual_seed(3))
    a = plain.generate(emb, SETTINGS[mode], return_scores=True)
    b = packed.generate(emb, SETTINGS[mode], return_scores=True)
    assert a.tokens == b.tokens
    assert len({tuple(t) for t in a.tokens}) > 1  # the inputs decode differently: a real comparison
    torch.testing.assert_close(torch.tensor(b.scores), torch.tensor(a.scores), rtol=1e-4, atol=1e-4)


def test_lora_layers_keep_their_own_forward(tmp_path, tiny_clip, tiny_gpt2):
    path = build_artifact(tmp_path / "lora", tiny_clip, tiny_gpt2, "causal",
                 lora=LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=["c_attn"]))
    plain = Captioner.from_pretrained(path, pack_weights=False)
    packed = Captioner.from_pretrained(path)
    lora_layers = [m for m in packed.model.lm.modules() if type(m).__module__.startswith("peft.tuners")]
    assert lora_layers and not any(isinstance(x, PackedLinear) for m in lora_layers for x in m.modules())
    assert _packed(packed.model.lm) > 0  # the other projections and the head are packed
    emb = torch.randn(4, C, generator=torch.Generator().manual_seed(5))
    assert plain.generate(emb, SETTINGS["greedy"]).tokens == packed.generate(emb, SETTINGS["greedy"]).tokens
