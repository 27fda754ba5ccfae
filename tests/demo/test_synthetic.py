"""The synthetic shapes dataset: determinism, captions that parse back, shards webdataset can read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prefixcap.demo import shapes, synthetic
from prefixcap.demo.shapes import Attributes, attribute_accuracy, attributes_correct, caption_attributes
from prefixcap.demo.synthetic import SyntheticConfig, generate_samples, read_shards, write_dataset

SMALL = SyntheticConfig(num_train=60, num_test=20, samples_per_shard=25, seed=3)


def _pixels(sample) -> np.ndarray:
    return np.asarray(sample.image)


def test_same_seed_same_samples_other_seed_differs():
    a = list(generate_samples(SMALL, "train"))
    b = list(generate_samples(SMALL, "train"))
    assert [s.captions for s in a] == [s.captions for s in b]
    assert [s.attributes for s in a] == [s.attributes for s in b]
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b))
    other = list(generate_samples(SyntheticConfig(num_train=60, seed=4), "train"))
    assert [s.attributes for s in a] != [s.attributes for s in other]


def test_test_split_is_independent_of_train_size_and_differs_from_train():
    test_small = [s.attributes for s in generate_samples(SMALL, "test")]
    bigger = SyntheticConfig(num_train=200, num_test=20, samples_per_shard=25, seed=3)
    assert [s.attributes for s in generate_samples(bigger, "test")] == test_small
    train_images = {_pixels(s).tobytes() for s in generate_samples(SMALL, "train")}
    assert not any(_pixels(s).tobytes() in train_images for s in generate_samples(SMALL, "test"))


def test_every_caption_parses_back_to_the_image_attributes():
    config = SyntheticConfig(num_train=300, num_test=0, references_per_image=5, seed=1)
    samples = list(generate_samples(config, "train"))
    for s in samples:
        assert len(s.captions) == 5 and len(set(s.captions)) >= 3, s.captions  # wordings vary
        for caption in s.captions:
            assert caption_attributes(caption) == s.attributes.triple, (s.key, caption)
            assert shapes.caption_size(caption) in (None, s.attributes.size), (s.key, caption)
    # The generator covers the vocabulary it was given.
    assert {s.attributes.colour for s in samples} == set(config.colours)
    assert {s.attributes.shape for s in samples} == set(config.shapes)
    assert {s.attributes.position for s in samples} == set(config.positions)


def test_image_shows_the_attributes():
    # The shape's colour is the image's dominant non-background colour and its centroid is where the
    # position says: a cheap check that captions describe the pixels, not just the metadata.
    for s in generate_samples(SyntheticConfig(num_train=40, num_test=0, image_format="png"), "train"):
        px = _pixels(s).astype(int)  # (H, W, 3)
        mask = np.abs(px - np.array(shapes.BACKGROUND)).sum(-1) > 60
        assert mask.sum() > 10, s.key
        mean_rgb = px[mask].mean(0)
        nearest = min(shapes.RGB, key=lambda c: np.abs(np.array(shapes.RGB[c]) - mean_rgb).sum())
        assert nearest == s.attributes.colour, (s.key, mean_rgb)
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / px.shape[1], ys.mean() / px.shape[0]
        ex, ey = shapes.POSITION_XY[s.attributes.position]
        assert abs(cx - ex) < 0.12 and abs(cy - ey) < 0.14, (s.key, s.attributes, cx, cy)


@pytest.mark.parametrize("caption, triple", [
    ("A big RED Circle, top.", ("red", "circle", "top")),
    ("there are two blue squares in the center", ("blue", "square", "centre")),
    ("a small green triangle near the lower edge", ("green", "triangle", "bottom")),
    ("a red circle", ("red", "circle", None)),  # missing position
    ("a red blue circle on the left", (None, "circle", "left")),  # contradictory colour
    ("a red circle on the left and on the right", ("red", "circle", None)),
    ("", (None, None, None)),
    ("the cat sat on the mat", (None, None, None)),
])
def test_caption_attributes_is_robust_to_wording(caption, triple):
    assert caption_attributes(caption) == triple


def test_attribute_accuracy_counts_each_attribute_and_all_three():
    truths = [Attributes("red", "circle", "left", "big"), Attributes("blue", "square", "top", "small")]
    preds = ["a red circle on the left", "a blue triangle at the top"]
    acc = attribute_accuracy(preds, truths)
    assert acc == {"colour": 1.0, "shape": 0.5, "position": 1.0, "all": 0.5}
    assert attributes_correct(preds[0], truths[0]) and not attributes_correct(preds[1], truths[1])
    assert attributes_correct("one red circle on the left side", ("red", "circle", "left"))
    with pytest.raises(ValueError, match="2 true attribute sets"):
        attribute_accuracy(preds[:1], truths)


def test_config_rejects_unknown_vocabulary():
    with pytest.raises(ValueError, match="shapes"):
        SyntheticConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="image_format"):
        SyntheticConfig(image_format="gif")


def test_shards_are_readable_by_webdataset_and_reproducible(tmp_path: Path):
    import webdataset as wds

    ds = write_dataset(tmp_path / "a", SMALL, progress=False)
    assert ds.counts == {"train": 60, "test": 20} and not ds.reused
    assert len(ds.shards["train"]) == 3 and len(ds.shards["test"]) == 1
    info = json.loads((tmp_path / "a" / synthetic.DATASET_FILE).read_text())
    assert info["shards"] == ds.shards and info["config"]["seed"] == 3

    # Plain webdataset, no prefixcap code: the format other tools (and `prefixcap preprocess`) read.
    raw = list(wds.WebDataset(ds.shard_paths("train"), shardshuffle=False).decode("pil"))
    expected = list(generate_samples(SMALL, "train"))
    assert [r["__key__"] for r in raw] == [s.key for s in expected]
    for r, s in zip(raw, expected):
        assert set(r) >= {"jpg", "txt", "json"}
        assert r["jpg"].size == (SMALL.image_size, SMALL.image_size)
        assert r["txt"] == s.caption == r["json"]["caption"]
        assert r["json"]["captions"][0] == s.caption
        assert Attributes(*(r["json"][k] for k in ("colour", "shape", "position", "size"))) == s.attributes
        assert caption_attributes(r["txt"]) == s.attributes.triple

    read = list(read_shards(ds.shard_paths("test")))
    assert len(read) == 20 and all(synthetic.sample_attributes(x.meta).triple == caption_attributes(x.caption)
                                   for x in read)

    # Same config in another folder: byte-identical shards (fixed tar mtime, seeded everything).
    other = write_dataset(tmp_path / "b", SMALL, progress=False)
    for split in ("train", "test"):
        for pa_, pb in zip(ds.shard_paths(split), other.shard_paths(split)):
            assert Path(pa_).read_bytes() == Path(pb).read_bytes()


def test_rerun_reuses_or_cleanly_replaces(tmp_path: Path):
    first = write_dataset(tmp_path, SMALL, progress=False)
    again = write_dataset(tmp_path, SMALL, progress=False)
    assert again.reused and again.shards == first.shards
    smaller = SyntheticConfig(num_train=10, num_test=5, samples_per_shard=25, seed=3, image_format="png",
                              captions_per_image=2)
    replaced = write_dataset(tmp_path, smaller, progress=False)
    assert not replaced.reused
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["train-00000.tar"]  # old shards gone
    samples = list(read_shards(replaced.shard_paths("train")))
    assert len(samples) == 20 and samples[0].key == "train_000000_0" and samples[1].key == "train_000000_1"
    assert samples[0].caption != samples[1].caption  # two wordings of one image
    assert samples[0].meta["image_id"] == samples[1].meta["image_id"] == 0


def test_read_shards_names_a_missing_shard(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        list(read_shards([tmp_path / "nope.tar"]))
