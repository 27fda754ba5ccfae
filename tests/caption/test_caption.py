"""Captioner: generate-based decoding matches a no-cache argmax reference, batching, counts, inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prefixcap.caption.captioner import Captioner, ImageInputError
from prefixcap.generation import MAX_NEW_TOKENS, GenerationSettings
from model_helpers import C, K, build_artifact


@pytest.fixture(scope="module")
def gpt2_artifact(tmp_path_factory, tiny_clip, tiny_gpt2) -> Path:
    return build_artifact(tmp_path_factory.mktemp("cap") / "gpt2_model", tiny_clip, tiny_gpt2, "causal")


@pytest.fixture(scope="module")
def t5_artifact(tmp_path_factory, tiny_clip, tiny_t5) -> Path:
    return build_artifact(tmp_path_factory.mktemp("cap") / "t5_model", tiny_clip, tiny_t5, "seq2seq",
                          mapping_type="transformer")


@pytest.fixture(scope="module")
def gpt2_cap(gpt2_artifact) -> Captioner:
    return Captioner.from_pretrained(gpt2_artifact)  # nothing but the path


@pytest.fixture(scope="module")
def t5_cap(t5_artifact) -> Captioner:
    return Captioner.from_pretrained(t5_artifact)


@pytest.fixture(params=["causal", "seq2seq"])
def cap(request, gpt2_cap, t5_cap) -> Captioner:
    return gpt2_cap if request.param == "causal" else t5_cap


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (32, 32), (64, 30), (33, 71), (48, 48), (20, 90)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)]


def embeddings(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed))  # (N, C)


@torch.no_grad()
def reference_greedy(cap: Captioner, emb: torch.Tensor, max_new: int) -> list[int]:
    """The original ClipCap loop: batch 1, no cache, the whole sequence re-run for every token."""
    model, eos = cap.model, cap.tokenizer.eos_token_id
    prefix = model.prefix(emb[None])  # (1, K, D)
    tokens: list[int] = []
    if model.config.lm_family == "causal":
        seq = prefix
        for _ in range(max_new):
            logits = model.lm(inputs_embeds=seq, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            if token == eos:
                break
            tokens.append(token)
            seq = torch.cat((seq, model.lm.get_input_embeddings()(torch.tensor([[token]]))), dim=1)
    else:
        decoder = [model.lm.config.decoder_start_token_id]
        for _ in range(max_new):
            logits = model.lm(inputs_embeds=prefix, decoder_input_ids=torch.tensor([decoder]),
                              use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            if token == eos:
                break
            tokens.append(token)
            decoder.append(token)
    return tokens


def test_greedy_matches_no_cache_argmax_reference(cap):
    emb = embeddings(4)
    out = cap.generate(emb, GenerationSettings(max_new_tokens=10))
    refs = [reference_greedy(cap, e, 10) for e in emb]
    assert out.tokens == refs
    assert any(len(set(r)) > 2 for r in refs), "degenerate model: the comparison would prove little"
    texts = cap.caption_embeddings(emb, max_new_tokens=10)
    assert texts == [cap.tokenizer.decode(r, skip_special_tokens=True).strip() for r in refs]


def test_generation_stops_at_end_of_text(gpt2_cap):
    assert gpt2_cap.eos_token_id == gpt2_cap.tokenizer.eos_token_id
    emb = embeddings(4, seed=1)
    full = gpt2_cap.generate(emb, GenerationSettings(max_new_tokens=10), return_scores=True).tokens
    stop = full[0][3]  # a token the model does produce: pretend it is the learned end-of-text
    original = gpt2_cap.eos_token_id
    gpt2_cap.eos_token_id = stop
    try:
        cut = gpt2_cap.generate(emb, GenerationSettings(max_new_tokens=10)).tokens
    finally:
        gpt2_cap.eos_token_id = original
    expected = [row[:row.index(stop)] if stop in row else row for row in full]
    assert cut == expected
    assert len(cut[0]) <= 3


@pytest.mark.parametrize("max_new", [1, 5])
def test_beam_search_counts_scores_and_length(cap, max_new):
    emb = embeddings(3, seed=2)
    texts, scores = cap.caption_embeddings(emb, num_beams=4, num_return_sequences=3, max_new_tokens=max_new,
                                           return_scores=True)
    assert len(texts) == 3 and all(len(t) == 3 for t in texts)
    assert len(scores) == 3 and all(len(s) == 3 for s in scores)
    for s in scores:
        assert s == sorted(s, reverse=True)  # beams come best first
    out = cap.generate(emb, GenerationSettings(num_beams=4, num_return_sequences=3, max_new_tokens=max_new))
    assert len(out.tokens) == 9 and all(len(t) <= max_new for t in out.tokens)


def test_sampling_counts_length_and_seed(cap):
    emb = embeddings(2, seed=3)
    kwargs = {"do_sample": True, "top_p": 0.9, "top_k": 0, "temperature": 1.5, "num_return_sequences": 4, "max_new_tokens": 6}
    torch.manual_seed(0)
    first = cap.caption_embeddings(emb, **kwargs)
    torch.manual_seed(0)
    again = cap.caption_embeddings(emb, **kwargs)
    assert first == again
    assert len(first) == 2 and all(len(t) == 4 for t in first)
    assert len({c for group in first for c in group}) > 1  # sampling, not one repeated caption
    torch.manual_seed(0)
    out = cap.generate(emb, GenerationSettings(do_sample=True, num_return_sequences=4, max_new_tokens=6))
    assert len(out.tokens) == 8 and all(len(t) <= 6 for t in out.tokens)


@pytest.mark.parametrize("settings", [{}, {"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}])
def test_batch_equals_one_by_one(cap, settings):
    images = random_images(5)
    batched = cap.caption(images, batch_size=4, max_new_tokens=8, **settings)
    single = [cap.caption(img, batch_size=1, max_new_tokens=8, **settings)[0] for img in images]
    assert batched == single
    assert len(batched) == 5


def test_input_kinds_give_the_same_caption(gpt2_cap, tmp_path):
    image = random_images(1, seed=4)[0]
    png = tmp_path / "img.png"
    image.save(png)
    arr = np.array(image)
    pixels = torch.from_numpy(gpt2_cap.preprocess(image))  # (3, H, W)
    inputs = [image, str(png), png, png.read_bytes(), arr, torch.from_numpy(arr).permute(2, 0, 1), pixels]
    captions = gpt2_cap.caption(inputs, max_new_tokens=6)
    assert len(set(captions)) == 1, captions
    assert gpt2_cap.caption(pixels[None].repeat(2, 1, 1, 1), max_new_tokens=6) == captions[:2]
    # Grey/alpha images go through the preprocess stage's RGB conversion.
    assert len(gpt2_cap.caption([image.convert("L"), image.convert("RGBA")], max_new_tokens=6)) == 2


def test_caption_matches_caption_embeddings_of_the_encoder(gpt2_cap):
    images = random_images(3, seed=5)
    emb = gpt2_cap.encode_pixels(gpt2_cap.load_pixels(images))  # (3, C)
    assert gpt2_cap.caption(images, max_new_tokens=6) == gpt2_cap.caption_embeddings(emb.numpy(), max_new_tokens=6)


def test_caption_reports_progress_per_batch_and_names_a_bad_input_in_a_later_batch(gpt2_cap, tmp_path):
    images = random_images(5, seed=6)
    seen: list[int] = []
    captions = gpt2_cap.caption(images, batch_size=2, progress=seen.append, max_new_tokens=6)
    assert seen == [2, 2, 1] and captions == gpt2_cap.caption(images, max_new_tokens=6)
    bad = tmp_path / "late.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageInputError, match=r"'.*late\.jpg' \(input 4\)"):
        gpt2_cap.caption([*images[:4], bad], batch_size=2, max_new_tokens=6)


def test_broken_input_is_named(gpt2_cap, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageInputError, match="broken.jpg"):
        gpt2_cap.caption([random_images(1)[0], bad])
    with pytest.raises(ImageInputError, match="not found"):
        gpt2_cap.caption([tmp_path / "missing.png"])
    with pytest.raises(ImageInputError, match=r"\(3, H, W\)"):
        gpt2_cap.caption([torch.zeros(4, 8, 8)])


def test_settings_are_validated(gpt2_cap):
    with pytest.raises(ValueError, match="num_beams"):
        gpt2_cap.caption_embeddings(embeddings(1), num_return_sequences=3)
    with pytest.raises(ValueError, match=r"shape \(B, 16\)"):
        gpt2_cap.caption_embeddings(torch.zeros(2, 7))


def test_max_new_tokens_fits_the_context(gpt2_cap):
    ctx = gpt2_cap.model.lm.config.n_positions
    out = gpt2_cap.generate(embeddings(1), GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    assert len(out.tokens[0]) <= ctx - K


def test_normalised_prefix_ignores_the_embedding_scale(tmp_path, tiny_clip, tiny_gpt2):
    cap = Captioner.from_pretrained(build_artifact(tmp_path / "norm", tiny_clip, tiny_gpt2, "causal",
                                                   normalize_prefix=True))
    emb = embeddings(3, seed=6)
    assert cap.caption_embeddings(emb, max_new_tokens=6) == cap.caption_embeddings(7.0 * emb, max_new_tokens=6)
    assert cap.config.normalize_prefix
