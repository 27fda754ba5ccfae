"""Encoder name resolution, image-mode conversion and the encoder interface on a tiny CLIP."""

import numpy as np
import pytest
import torch
from PIL import Image

from prefixcap.data.images import to_rgb
from prefixcap.model.encoders import (
    UnknownEncoderError, load_encoder, normalize, resolve_encoder,
)


def test_openai_aliases_map_to_hf_ids():
    assert resolve_encoder("ViT-B/32").name == "openai/clip-vit-base-patch32"
    assert resolve_encoder("ViT-L/14@336px").name == "openai/clip-vit-large-patch14-336"
    assert resolve_encoder("google/siglip-base-patch16-224").backend == "hf"
    spec = resolve_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert (spec.backend, spec.name) == ("open_clip", "ViT-B-32/laion2b_s34b_b79k")


def test_resnet_clip_names_point_to_open_clip():
    with pytest.raises(UnknownEncoderError, match="open_clip:RN50/openai") as err:
        resolve_encoder("RN50")
    assert "ViT-B/32" in str(err.value)  # the error lists the supported names


def test_unknown_name_is_refused_with_the_supported_list():
    with pytest.raises(UnknownEncoderError, match="ViT-B/16"):
        resolve_encoder("not-a-model")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_to_rgb_converts_every_mode(mode):
    img = Image.new(mode, (5, 4))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 4)


def test_to_rgb_puts_transparency_on_white():
    img = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_normalize_keeps_dims():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert torch.allclose(normalize(x), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_tiny_clip_interface_matches_transformers(tiny_clip):
    from transformers import CLIPModel

    enc = load_encoder(tiny_clip)
    pixels = enc.preprocessor()(Image.new("RGB", (64, 48), (200, 10, 10)))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    emb = enc.encode_pixels(torch.from_numpy(pixels)[None])
    assert emb.shape == (1, enc.embedding_dim) == (1, 16)
    ref = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        expected = ref.get_image_features(pixel_values=torch.from_numpy(pixels)[None]).pooler_output
    assert torch.allclose(emb, expected, atol=1e-5)
    text = enc.encode_text(["a red circle", "a blue square on the left"])
    assert text.shape == (2, 16) and not torch.allclose(text[0], text[1])


def test_encoder_layers_are_prepacked_on_cpu_with_the_same_features(tiny_clip):
    """fp32 on the CPU: every nn.Linear of both towers becomes a PackedLinear, image and text features equal
    transformers' own to float rounding; pack_weights=False keeps transformers' layers."""
    from transformers import AutoTokenizer, CLIPModel

    from prefixcap.model.packing import PackedLinear, packing_available

    if not packing_available():
        pytest.skip("this PyTorch build has no oneDNN")
    packed, plain = load_encoder(tiny_clip), load_encoder(tiny_clip, pack_weights=False)
    ref = CLIPModel.from_pretrained(tiny_clip).eval()
    linears = sum(type(m) is torch.nn.Linear for m in ref.modules())
    assert linears > 10 and sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == linears
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["a red circle", "a blue square on the left", "two green stars"]
    ids = AutoTokenizer.from_pretrained(tiny_clip)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want_img = ref.get_image_features(pixel_values=pixels).pooler_output
        want_txt = ref.get_text_features(**ids).pooler_output
    for enc in (packed, plain):
        torch.testing.assert_close(enc.encode_pixels(pixels), want_img, rtol=0, atol=1e-5)
        torch.testing.assert_close(enc.encode_text(texts), want_txt, rtol=0, atol=1e-5)


def test_unloadable_folder_names_it(tmp_path):
    with pytest.raises(UnknownEncoderError, match=str(tmp_path)):
        load_encoder(str(tmp_path))
