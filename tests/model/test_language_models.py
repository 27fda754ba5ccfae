"""Tokenisation for causal and seq2seq LM families."""

import pytest

from prefixcap.model.language_models import (
    LanguageModelError, detect_family, family_of_type, load_tokenizer, tokenize_caption,
)


def test_family_registry():
    assert family_of_type("gpt2") == family_of_type("gpt-j") == "causal"
    assert family_of_type("t5") == family_of_type("t0") == "seq2seq"
    with pytest.raises(LanguageModelError, match="gpt2, gpt-j, t5, t0"):
        family_of_type("bert")


def test_auto_family_reads_the_config(tiny_gpt2, tiny_t5):
    assert detect_family(tiny_gpt2) == "causal"
    assert family_of_type("auto", tiny_t5) == "seq2seq"


def test_causal_caption_ends_with_eos_and_roundtrips(tiny_gpt2):
    tok = load_tokenizer(tiny_gpt2)
    out = tokenize_caption(tok, "causal", "A red circle on the left!", 64)
    assert out.tokens[-1] == tok.eos_token_id and not out.truncated
    assert tok.decode(out.tokens[:-1]) == "A red circle on the left!"


def test_truncation_keeps_eos(tiny_gpt2, tiny_t5):
    for path, family in [(tiny_gpt2, "causal"), (tiny_t5, "seq2seq")]:
        tok = load_tokenizer(path)
        out = tokenize_caption(tok, family, "a very long caption " * 20, 8)
        assert out.truncated and len(out.tokens) == 8 and out.tokens[-1] == tok.eos_token_id


def test_seq2seq_eos_not_doubled(tiny_t5):
    tok = load_tokenizer(tiny_t5)
    out = tokenize_caption(tok, "seq2seq", "a blue square", 64)
    assert out.tokens.count(tok.eos_token_id) == 1 and out.tokens[-1] == tok.eos_token_id


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(LanguageModelError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))
