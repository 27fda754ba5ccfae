"""Metrics: hand-worked BLEU/ROUGE-L/CIDEr-D cases, PTB tokenisation, METEOR, SPICE detection, CLIPScore."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import prefixcap.evaluate.metrics as M

needs_java = pytest.mark.skipif(not M.java_available(), reason="java is not on PATH")

# Three images with unrelated captions, so every n-gram has a non-zero IDF in CIDEr-D.
REFS = {
    "1": ["a man riding a brown horse on a beach", "a person rides a horse near the sea"],
    "2": ["two small dogs playing with a red frisbee", "dogs chase a frisbee in the park"],
    "3": ["a plate of rice and broccoli", "food on a white plate"],
}


def test_bleu_textbook_examples():
    # Papineni et al. (2002), section 2.1.1: modified unigram precision of "the the the ..." is 2/7;
    # the candidate's 7 words match the 7-word reference length, so the brevity penalty is 1.
    refs = {"x": ["the cat is on the mat", "there is a cat on the mat"]}
    s = M.coco_scores({"x": "the the the the the the the"}, refs, ["bleu"], tokenizer="simple")
    assert s.corpus["Bleu_1"] == pytest.approx(2 / 7, abs=1e-6)
    assert s.corpus["Bleu_4"] < 1e-3  # no matching bigram
    # Brevity penalty: "the cat" has p1 = p2 = 1, c = 2, r = 6 -> BP = exp(1 - 6/2).
    s = M.coco_scores({"x": "the cat"}, {"x": ["the cat is on the mat"]}, ["bleu"], tokenizer="simple")
    assert s.corpus["Bleu_1"] == pytest.approx(math.exp(-2), abs=1e-6)
    assert s.corpus["Bleu_2"] == pytest.approx(math.exp(-2), abs=1e-6)


def test_rouge_l_hand_worked():
    # LCS("a dog runs", "a big dog on grass") = "a dog": P = 2/3, R = 2/5, F_beta with beta = 1.2.
    s = M.coco_scores({"x": "a dog runs"}, {"x": ["a big dog on grass"]}, ["rouge"], tokenizer="simple")
    p, r, b2 = 2 / 3, 2 / 5, 1.2 ** 2
    assert s.corpus["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=1e-9)


def test_identical_and_disjoint_captions_simple_tokenizer():
    same = {k: v[0] for k, v in REFS.items()}
    s = M.coco_scores(same, {k: [v[0]] for k, v in REFS.items()}, ["bleu", "rouge", "cider"], tokenizer="simple")
    # A caption equal to every reference: BLEU-n = 1, ROUGE-L = 1, CIDEr-D = 10 (its maximum:
    # cosine 1 for each n, no length penalty, times 10).
    for col in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L"):
        assert s.corpus[col] == pytest.approx(1.0, abs=1e-6), col
    assert s.corpus["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    disjoint = {"1": "zebra zebra giraffe", "2": "blue sky above mountains", "3": "an old clock tower"}
    s = M.coco_scores(disjoint, REFS, ["bleu", "rouge", "cider"], tokenizer="simple")
    for col in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert s.corpus[col] == pytest.approx(0.0, abs=1e-6), col
        assert all(v[col] == pytest.approx(0.0, abs=1e-6) for v in s.per_image.values())


@needs_java
def test_ptb_tokenize_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = {"1": ["A man riding a horse.", "Two dogs, playing!"], "2": ["It's a dog's life -- isn't it?", ""],
            "3": ["café au lait", "A (small) cat; on: a mat..."]}
    ours = M.ptb_tokenize(caps)
    theirs = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    assert ours == theirs
    assert ours["2"][0] == "it 's a dog 's life is n't it"
    # A carriage return inside a caption must not shift later captions (upstream loses a line here).
    assert M.ptb_tokenize({"a": ["x\ry"], "b": ["last one"]}) == {"a": ["x y"], "b": ["last one"]}


@needs_java
def test_ptb_metrics_identical_and_disjoint():
    # METEOR (a 10-30 s Java start-up) is checked once, in test_evaluate's end-to-end run.
    preds = {"1": "A man riding a brown horse on a beach.", "2": "zebra zebra giraffe", "3": ""}
    s = M.coco_scores(preds, REFS, ["bleu", "rouge", "cider"], tokenizer="ptb")
    assert s.tokenizer == "ptb"
    one, two, three = s.per_image["1"], s.per_image["2"], s.per_image["3"]
    assert one["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert one["ROUGE_L"] == pytest.approx(1.0)
    assert one["CIDEr"] > 1.0
    for col in ("Bleu_1", "ROUGE_L", "CIDEr"):
        assert two[col] == pytest.approx(0.0, abs=1e-6), col
        assert three[col] == pytest.approx(0.0, abs=1e-6), col  # an empty caption scores zero
    # Corpus CIDEr-D is the mean of the per-image scores.
    assert s.corpus["CIDEr"] == pytest.approx(np.mean([v["CIDEr"] for v in s.per_image.values()]))


def test_spice_without_corenlp_is_skipped_with_one_line(monkeypatch):
    monkeypatch.setattr(M, "SPICE_CORENLP_JARS", ("no-such-corenlp.jar",))
    ok, reason = M.spice_status()
    assert not ok and "\n" not in reason and "SPICE skipped" in reason
    s = M.coco_scores({"1": "a horse"}, REFS, ["spice", "bleu"], tokenizer="simple")
    assert "SPICE" not in s.corpus and "spice" in s.skipped
    assert sum("SPICE" in n for n in s.notices) == 1
    assert "Bleu_4" in s.corpus


def test_without_java_falls_back_and_skips_meteor(monkeypatch):
    monkeypatch.setattr(M, "java_available", lambda: False)
    s = M.coco_scores({"1": "a man riding a horse"}, REFS, ["bleu", "meteor", "cider"])
    assert s.tokenizer == "simple"
    assert "METEOR" not in s.corpus and "meteor" in s.skipped
    assert any("not comparable" in n for n in s.notices)


def test_reference_missing_is_an_error():
    with pytest.raises(ValueError, match="no reference"):
        M.coco_scores({"9": "a cat"}, REFS, ["bleu"], tokenizer="simple")


def test_diversity_stats():
    d = M.diversity_stats(["A dog.", "a dog", "A cat runs!"])
    assert d["mean_length_words"] == pytest.approx(7 / 3)
    assert d["vocabulary_size"] == 4
    assert d["distinct_captions"] == 2
    assert d["distinct_caption_share"] == pytest.approx(2 / 3)


class FakeEncoder:
    """Text embeddings looked up by string: lets the CLIPScore formula be checked by hand."""

    embedding_dim = 2

    def __init__(self, table):
        self.table = table

    def encode_text(self, texts):
        return torch.tensor([self.table[t] for t in texts], dtype=torch.float32)


def test_clip_score_formula_by_hand():
    p = M.CLIPSCORE_PREFIX
    enc = FakeEncoder({p + "good": [1.0, 0.0], p + "bad": [-1.0, 0.2], p + "r1": [0.6, 0.8], p + "r2": [0.0, 1.0],
                       p + "r3": [-1.0, 0.0]})
    images = np.array([[3.0, 4.0], [1.0, 0.0]])  # (2, C), not normalised on purpose
    cs = M.clip_scores(enc, images, ["good", "bad"], [["r1", "r2"], ["r3"]])
    clip_good = 2.5 * 0.6  # cos([1,0], [0.6,0.8]) = 0.6
    assert cs.clip_score[0] == pytest.approx(clip_good)
    assert cs.clip_score[1] == 0.0  # negative cosine clipped at 0
    best = max(0.6, 0.0)  # max cosine of "good" with r1, r2
    assert cs.ref_clip_score[0] == pytest.approx(2 * clip_good * best / (clip_good + best))
    assert cs.ref_clip_score[1] == 0.0  # both parts 0: defined as 0, not NaN
    assert cs.summary()["CLIPScore"] == pytest.approx(clip_good / 2)


def test_clip_score_matches_direct_transformers_computation(tiny_clip):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from prefixcap.model.encoders import load_encoder

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 36, 3), dtype=np.uint8)) for i in range(3)]
    captions = ["a red circle on the left", "two dogs are playing", "a blue square at the top"]
    refs = [["a red circle", "one red circle on the left."], ["a green star"], ["a big blue square", "a cat"]]

    encoder = load_encoder(tiny_clip)
    feats, ok = M.encode_images(encoder, images)
    assert ok.all()
    ours = M.clip_scores(encoder, feats, captions, refs)

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    proc = CLIPImageProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
        img = getattr(img, "pooler_output", img)

        def text(ts):
            out = model.get_text_features(**tok(["A photo depicts " + t for t in ts], padding=True,
                                               return_tensors="pt"))
            return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)

        img = torch.nn.functional.normalize(img, dim=-1)
        cand = text(captions)
        cos = (img * cand).sum(-1)
        expected_clip = 2.5 * cos.clamp_min(0)
        expected_ref = []
        for i, rs in enumerate(refs):
            best = max(float((cand[i] * text(rs)).sum(-1).max()), 0.0)
            c = float(expected_clip[i])
            expected_ref.append(0.0 if c + best == 0 else 2 * c * best / (c + best))
    np.testing.assert_allclose(ours.clip_score, expected_clip.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.ref_clip_score, expected_ref, atol=1e-5)


def test_encode_images_marks_unreadable_files(tiny_clip, tmp_path):
    from prefixcap.model.encoders import load_encoder

    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), "red").save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    feats, ok = M.encode_images(load_encoder(tiny_clip), [str(good), str(bad), str(tmp_path / "missing.png")])
    assert ok.tolist() == [True, False, False]
    assert feats.shape == (3, 16) and float(feats[0].norm()) == pytest.approx(1.0, abs=1e-5)


@needs_java
def test_spice_failure_is_a_notice_not_a_crash(monkeypatch):
    # CoreNLP "present" but the jar broken: SPICE's Java exits non-zero -> one notice, other metrics kept.
    from pycocoevalcap.spice import spice as spice_module

    monkeypatch.setattr(M, "spice_status", lambda: (True, ""))
    monkeypatch.setattr(spice_module, "SPICE_JAR", "no-such-spice.jar")
    s = M.coco_scores({"1": "a horse"}, REFS, ["spice", "cider"], tokenizer="simple")
    assert "spice" in s.skipped and s.skipped["spice"].startswith("SPICE failed")
    assert "CIDEr" in s.corpus
