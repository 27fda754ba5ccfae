"""The batch-captioning pipeline: order, per-item errors, batch fallback, images and embeddings mixed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from prefixcap.caption.captioner import Captioner, ImageInputError
from prefixcap.model.mapping import MappingConfig
from prefixcap.model import CaptionConfig, CaptionModel
from prefixcap.caption.pipeline import (EmbeddingWidthError, Item, PipelineOptions, call_with_fallback, caption_batches,
                                caption_items)

C = 16
POISON = 7.0  # an embedding filled with this makes FlakyCaptioner.generate fail for its whole batch


class FlakyCaptioner(Captioner):
    """Fails any generate call whose batch holds a poisoned embedding; counts calls."""

    calls: list[int]

    def generate(self, embeddings, settings=None, return_scores=False, **kwargs):
        self.calls.append(int(embeddings.shape[0]))
        if bool((torch.as_tensor(embeddings) == POISON).all(dim=1).any()):
            raise ValueError("poisoned embedding")
        return super().generate(embeddings, settings, return_scores, **kwargs)


@pytest.fixture(scope="module")
def cap(tiny_clip, tiny_gpt2) -> FlakyCaptioner:
    torch.manual_seed(0)
    config = CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                           mapping=MappingConfig(prefix_size=C, prefix_length=4), max_token_length=6)
    captioner = FlakyCaptioner(CaptionModel(config))
    captioner.calls = []
    yield captioner
    captioner.close()


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 34, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def embeddings(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, C)).astype(np.float32)


def test_order_is_kept_and_matches_the_captioner(cap):
    emb = embeddings(7)
    items = [Item(f"k{i}", embedding=e) for i, e in enumerate(emb)]
    batches = list(caption_batches(cap, items, PipelineOptions(batch_size=3, prefetch=1)))
    assert [len(b) for b in batches] == [3, 3, 1]
    results = [r for b in batches for r in b]
    assert [r.key for r in results] == [f"k{i}" for i in range(7)]
    assert all(r.error is None for r in results)
    assert [r.caption for r in results] == cap.caption_embeddings(emb)


def test_images_and_embeddings_mixed_with_known_and_decoding_errors(cap):
    emb = embeddings(2, seed=1)
    items = [Item("img0", image=png(0)), Item("emb0", embedding=emb[0]), Item("gone", error="missing_image: x"),
             Item("broken", image=b"not an image"), Item("img1", image=png(1)), Item("emb1", embedding=emb[1])]
    results = list(caption_items(cap, items, PipelineOptions(batch_size=4, num_workers=2)))
    assert [r.key for r in results] == ["img0", "emb0", "gone", "broken", "img1", "emb1"]
    by_key = {r.key: r for r in results}
    assert by_key["gone"].error == "missing_image: x" and by_key["gone"].captions == []
    assert by_key["broken"].error.startswith("not_an_image")
    assert [by_key[k].caption for k in ("img0", "img1")] == cap.caption([png(0), png(1)])
    assert [by_key[k].caption for k in ("emb0", "emb1")] == cap.caption_embeddings(emb)
    assert by_key["img0"].item.image == png(0)  # the item travels with its result


def test_a_failing_batch_falls_back_to_one_item_at_a_time(cap):
    emb = embeddings(4, seed=2)
    emb[1] = POISON
    cap.calls.clear()
    results = list(caption_items(cap, [Item(str(i), embedding=e) for i, e in enumerate(emb)],
                                 PipelineOptions(batch_size=4, return_scores=True)))
    assert cap.calls == [4, 1, 1, 1, 1]  # the batch, then each item alone
    assert results[1].error == "poisoned embedding" and results[1].captions == []
    good = [results[i] for i in (0, 2, 3)]
    assert [r.caption for r in good] == cap.caption_embeddings(emb[[0, 2, 3]])
    assert all(r.error is None and len(r.scores) == 1 for r in good)


def test_several_sequences_per_item(cap):
    from prefixcap.generation import GenerationSettings

    settings = GenerationSettings(num_beams=3, num_return_sequences=2)
    results = list(caption_items(cap, [Item("a", embedding=embeddings(1)[0])], PipelineOptions(settings=settings)))
    assert len(results[0].captions) == 2
    assert results[0].captions == cap.caption_embeddings(embeddings(1), settings=settings)[0]


def test_wrong_embedding_width_stops_the_run_at_once(cap):
    items = [Item("ok", embedding=embeddings(1)[0]), Item("wide", embedding=np.zeros(C + 3, np.float32))]
    with pytest.raises(EmbeddingWidthError, match=r"'wide' has 19 values but the model expects 16"):
        list(caption_items(cap, items))


def test_captioner_caption_names_an_unreadable_image(cap):
    with pytest.raises(ImageInputError, match=r"cannot read image input 1 \(bytes\): not_an_image"):
        cap.caption([png(0), b"junk", png(1)], batch_size=2)


def test_call_with_fallback_policy():
    def double(xs: list[int]) -> list[int]:
        if 0 in xs:
            raise ZeroDivisionError("zero")
        return [2 * x for x in xs]

    assert call_with_fallback(double, [1, 2, 3]) == [2, 4, 6]
    out = call_with_fallback(double, [1, 0, 3])
    assert out[0] == 2 and out[2] == 6 and isinstance(out[1], ZeroDivisionError)
    assert isinstance(call_with_fallback(double, [0])[0], ZeroDivisionError)
    assert call_with_fallback(double, []) == []
    # A function that loses results is treated as a failure of that call, not silently misaligned.
    assert all(isinstance(r, RuntimeError) for r in call_with_fallback(lambda xs: [], [1, 2]))

    def interrupted(xs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        call_with_fallback(interrupted, [1, 2])
