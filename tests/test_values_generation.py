"""GenerationSettings.problems(): exactly which fields are reported, with which message, when checks combine."""

from __future__ import annotations

from prefixcap.generation import GenerationSettings


def test_more_return_sequences_than_beams_is_reported_on_that_field_with_the_reason():
    problems = GenerationSettings(num_beams=2, num_return_sequences=3).problems()
    assert problems == {"num_return_sequences": (
        "num_return_sequences=3 needs num_beams >= 3 (or do_sample=true): greedy/beam search can only "
        "return as many distinct captions as it keeps beams")}
    assert GenerationSettings(num_beams=3, num_return_sequences=3).problems() == {}
    assert GenerationSettings(do_sample=True, num_return_sequences=3).problems() == {}


def test_a_field_already_wrong_is_not_also_cross_checked():
    # An out-of-range count keeps its own message (not replaced by the beams one) ...
    out_of_range = GenerationSettings(num_beams=2, num_return_sequences=1000).problems()
    assert list(out_of_range) == ["num_return_sequences"]
    assert "out of range" in out_of_range["num_return_sequences"]
    # ... and a do_sample of the wrong type (0 is not a boolean) reports only itself.
    wrong_type = GenerationSettings(do_sample=0, num_return_sequences=2).problems()
    assert list(wrong_type) == ["do_sample"]
