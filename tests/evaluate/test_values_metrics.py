"""COCO metrics with mixed-case text and unsorted keys: expected values worked out by hand.

BLEU-1 and ROUGE-L per image are small enough to compute on paper (comments show the sums), so a
tokenizer that stops lower-casing, or per-image scores attached to the keys in another order
(e.g. sorted), changes pinned numbers.
"""

from __future__ import annotations

import math

import pytest

import prefixcap.evaluate.metrics as M

# Deliberately not in sorted order, and the references in yet another order.
PREDICTIONS = {"b": "A Dog Runs On The Grass", "a": "Blue Sky", "c": "Two Cats"}
REFERENCES = {"c": ["two cats sleeping"], "a": ["a red car", "the red car parked"],
              "b": ["a dog runs on the grass", "A DOG IS RUNNING"]}


def test_simple_tokenizer_lowercases_and_drops_punctuation():
    assert M.simple_tokenize({"z": ["A Man's DOG, running!", "Two  CATS."], "y": ["Über-Café"]}) == {
        "z": ["a man's dog running", "two cats"], "y": ["über café"]}
    assert M.words("The CAT, the cat.") == ["the", "cat", "the", "cat"]
    stats = M.diversity_stats(["A Dog.", "a dog", "Two cats"])
    assert stats == {"mean_length_words": 2.0, "vocabulary_size": 4, "distinct_captions": 2,
                     "distinct_caption_share": 2 / 3}


@pytest.mark.parametrize("tokenizer", ["simple", pytest.param("ptb", marks=pytest.mark.skipif(
    not M.java_available(), reason="the PTB tokenizer needs java"))])
def test_mixed_case_unsorted_keys_pinned_values(tokenizer):
    s = M.coco_scores(PREDICTIONS, REFERENCES, metrics=["bleu", "rouge", "cider"],
                      tokenizer="auto" if tokenizer == "ptb" else tokenizer)  # auto is ptb when Java is there
    assert s.tokenizer == tokenizer
    assert list(s.per_image) == ["b", "a", "c"]  # the caller's key order
    per = s.per_image
    # b: after lower-casing every word of the prediction is in reference 1, same length: BLEU-1 = 1.
    assert per["b"]["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert per["b"]["ROUGE_L"] == pytest.approx(1.0, abs=1e-9)
    # a: no word in common.
    assert per["a"]["Bleu_1"] == pytest.approx(0.0, abs=1e-6)
    assert per["a"]["ROUGE_L"] == 0.0 and per["a"]["CIDEr"] == 0.0
    # c: precision 2/2, brevity penalty exp(1 - 3/2); ROUGE-L: P=1, R=2/3, beta=1.2.
    assert per["c"]["Bleu_1"] == pytest.approx(math.exp(-0.5), abs=1e-6)
    rouge_c = (1 + 1.2 ** 2) * 1 * (2 / 3) / (2 / 3 + 1.2 ** 2 * 1)
    assert per["c"]["ROUGE_L"] == pytest.approx(rouge_c, abs=1e-9)
    # Corpus BLEU-1: 8 matched of 10 words; closest reference lengths 6 + 3 + 3 = 12 -> BP exp(1 - 12/10).
    assert s.corpus["Bleu_1"] == pytest.approx(0.8 * math.exp(-0.2), abs=1e-6)
    assert s.corpus["ROUGE_L"] == pytest.approx((1 + 0 + rouge_c) / 3, abs=1e-9)
    # CIDEr-D (pycocoevalcap's; regression values of this input, corpus = mean of per-image).
    assert per["b"]["CIDEr"] == pytest.approx(5.672337654806988, rel=1e-9)
    assert per["c"]["CIDEr"] == pytest.approx(3.7564711970301365, rel=1e-9)
    assert s.corpus["CIDEr"] == pytest.approx((per["b"]["CIDEr"] + per["c"]["CIDEr"]) / 3, rel=1e-9)


def test_per_image_scores_follow_keys_not_position():
    """Reordering the same predictions reorders nothing in the per-key figures."""
    forward = M.coco_scores(PREDICTIONS, REFERENCES, metrics=["bleu", "rouge"], tokenizer="simple")
    backward = M.coco_scores(dict(reversed(list(PREDICTIONS.items()))), REFERENCES, metrics=["bleu", "rouge"],
                             tokenizer="simple")
    assert list(backward.per_image) == ["c", "a", "b"]
    for key in PREDICTIONS:
        assert backward.per_image[key] == pytest.approx(forward.per_image[key], abs=1e-12)


def test_refusals_name_what_was_wrong():
    with pytest.raises(ValueError, match=r"^unknown metric\(s\) \['nope'\]; expected some of bleu, meteor, rouge, "
                                         r"cider, spice$"):
        M.coco_scores({"a": "x"}, {"a": ["x"]}, metrics=["bleu", "nope"], tokenizer="simple")
    preds = {k: "x" for k in "vwxyz"}
    with pytest.raises(ValueError, match=r"^5 prediction\(s\) have no reference, e.g. \['v', 'w', 'x'\]$"):
        M.coco_scores(preds, {}, metrics=["bleu"], tokenizer="simple")
    with pytest.raises(ValueError, match=r"^unknown tokenizer 'moses'; expected auto, ptb or simple$"):
        M.coco_scores({"a": "x"}, {"a": ["x"]}, metrics=["bleu"], tokenizer="moses")


def test_empty_input_gives_empty_scores():
    empty = M.coco_scores({}, {}, metrics=["bleu", "cider"], tokenizer="simple")
    assert empty == M.CocoScores({}, {}, "simple", [], {})
    assert M.diversity_stats([]) == {"mean_length_words": 0.0, "vocabulary_size": 0, "distinct_captions": 0,
                                     "distinct_caption_share": 0.0}


def test_without_java_the_notices_and_skips_are_exact(monkeypatch):
    monkeypatch.setattr(M, "java_available", lambda: False)
    s = M.coco_scores(PREDICTIONS, REFERENCES, metrics=["meteor", "bleu", "spice", "cider"])
    assert s.tokenizer == "simple"
    assert s.skipped == {"meteor": "METEOR skipped: Java is not on PATH", "spice": "SPICE skipped: Java is not on PATH"}
    assert s.notices == [
        "Java is not on PATH: captions tokenised without the PTB tokenizer, so BLEU/ROUGE-L/CIDEr are not "
        "comparable with published tables",
        "METEOR skipped: Java is not on PATH", "SPICE skipped: Java is not on PATH"]
    # The metrics after a skipped one are still computed.
    assert set(s.corpus) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    assert s.corpus["Bleu_1"] == pytest.approx(0.8 * math.exp(-0.2), abs=1e-6)


def test_spice_results_timeout_and_failures_are_routed(monkeypatch):
    monkeypatch.setattr(M, "java_available", lambda: True)
    monkeypatch.setattr(M, "spice_status", lambda: (True, ""))
    seen = {}

    def fake_spice(tok_preds, tok_refs, timeout_s):
        seen["timeout"] = timeout_s
        return 0.25, {k: 0.1 * (i + 1) for i, k in enumerate(tok_preds)}

    monkeypatch.setattr(M, "_run_spice", fake_spice)
    s = M.coco_scores(PREDICTIONS, REFERENCES, metrics=["spice", "rouge"], tokenizer="simple")
    assert seen["timeout"] == 3600 and s.corpus["SPICE"] == 0.25
    assert set(s.corpus) == {"SPICE", "ROUGE_L"}  # the metric after SPICE still runs
    assert {k: v["SPICE"] for k, v in s.per_image.items()} == {"b": 0.1, "a": 0.2, "c": pytest.approx(0.3)}
    M.coco_scores(PREDICTIONS, REFERENCES, metrics=["spice"], tokenizer="simple", spice_timeout_s=7)
    assert seen["timeout"] == 7

    def broken(*args):
        raise M.MetricError("jar exited 1")

    monkeypatch.setattr(M, "_run_spice", broken)
    s = M.coco_scores(PREDICTIONS, REFERENCES, metrics=["spice", "bleu"], tokenizer="simple")
    assert s.skipped == {"spice": "jar exited 1"} and s.notices == ["SPICE skipped: jar exited 1"]
    assert s.corpus["Bleu_1"] == pytest.approx(0.8 * math.exp(-0.2), abs=1e-6)  # later metrics still run
    monkeypatch.setattr(M, "spice_status", lambda: (False, "SPICE skipped: no CoreNLP"))
    s = M.coco_scores(PREDICTIONS, REFERENCES, metrics=["spice"], tokenizer="simple")
    assert s.skipped == {"spice": "SPICE skipped: no CoreNLP"} and s.notices == ["SPICE skipped: no CoreNLP"]
    assert s.corpus == {} and all(v == {} for v in s.per_image.values())
