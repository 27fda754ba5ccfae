"""Language-model families (causal vs seq2seq): names, tokenizers and caption tokenisation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prefixcap.errors import PrefixcapError
from prefixcap.model.hub import check_reachable

# The seed's --tokenizer_model_type values -> LM family and a default checkpoint.
MODEL_TYPES: dict[str, dict[str, str]] = {
    "gpt2": {"family": "causal", "default_variant": "gpt2-xl"},
    "gpt-j": {"family": "causal", "default_variant": "EleutherAI/gpt-j-6B"},
    "t5": {"family": "seq2seq", "default_variant": "t5-base"},
    "t0": {"family": "seq2seq", "default_variant": "bigscience/T0_3B"},
    # Any other Hugging Face LM: the family is read from its config (is_encoder_decoder).
    "auto": {"family": "auto", "default_variant": "gpt2"},
}
FAMILIES = ("causal", "seq2seq")


class LanguageModelError(PrefixcapError, ValueError):
    """Raised for an unknown LM type, an unloadable tokenizer or an LM that does not fit."""


def family_of_type(model_type: str, name_or_path: str | None = None, **hf_kwargs: Any) -> str:
    """The LM family for a --tokenizer_model_type; 'auto' asks the model's config."""
    if model_type not in MODEL_TYPES:
        raise LanguageModelError(
            f"unknown tokenizer/LM type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}"
        )
    family = MODEL_TYPES[model_type]["family"]
    if family == "auto":
        if name_or_path is None:
            raise LanguageModelError("model type 'auto' needs a model name or folder")
        family = detect_family(name_or_path, **hf_kwargs)
    return family


def detect_family(name_or_path: str, **hf_kwargs: Any) -> str:
    from transformers import AutoConfig

    try:
        check_reachable(name_or_path)  # a missing folder / unreachable Hub: at once, not after retries
        config = AutoConfig.from_pretrained(name_or_path, **hf_kwargs)
    except (OSError, ValueError) as err:
        raise LanguageModelError(f"cannot load the config of language model {name_or_path!r}: {err}") from err
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def load_tokenizer(name_or_path: str, **hf_kwargs: Any):
    """Load a tokenizer and give it a pad token (GPT-2 has none; padding is masked anyway)."""
    from transformers import AutoTokenizer

    try:
        check_reachable(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hf_kwargs)
    except (OSError, ValueError) as err:
        where = "folder" if os.path.isdir(name_or_path) else "Hugging Face model"
        raise LanguageModelError(f"cannot load a tokenizer from {where} {name_or_path!r}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer well enough to refuse a mismatched LM/dataset pair."""
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }


@dataclass
class TokenizedCaption:
    tokens: list[int]
    truncated: bool


def tokenize_caption(tokenizer, family: str, caption: str, max_length: int) -> TokenizedCaption:
    """Caption -> token ids ending in the end-of-text token, truncated to max_length.

    Causal LMs get eos appended so generation learns to stop. Seq2seq tokenizers (T5) add their
    own eos. Truncation keeps the eos as the last token so a long caption still ends properly.
    """
    if family == "causal":
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        ids = list(ids) + [tokenizer.eos_token_id]
    else:
        ids = list(tokenizer(caption, add_special_tokens=True)["input_ids"])
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
    truncated = len(ids) > max_length
    if truncated:
        ids = ids[: max_length - 1] + [tokenizer.eos_token_id]
    return TokenizedCaption(ids, truncated)


def load_language_model(name_or_path: str, family: str, dtype=None, **hf_kwargs: Any):
    """Load a causal or seq2seq LM by family."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}[family]
    try:
        check_reachable(name_or_path)
        return cls.from_pretrained(name_or_path, dtype=dtype, **hf_kwargs)
    except (OSError, ValueError) as err:
        raise LanguageModelError(f"cannot load language model {name_or_path!r}: {err}") from err
