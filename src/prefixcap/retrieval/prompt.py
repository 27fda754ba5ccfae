"""The retrieval prompt: its settings (recorded in a model's config), its text, its tokens and its LM inputs.

SmallCap's format: after the visual prefix the LM reads "Similar images show: c1. c2. ... This image
shows" and then the caption. The prompt tokens are context only: the loss is taken on the caption
tokens alone (`prompted_targets`), and at inference `generate` continues after the prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PROMPT_FORMAT = "Similar images show: {captions} This image shows"  # SmallCap's template
MAX_PROMPT_CAPTION_TOKENS = 24  # each retrieved caption is cut to this many tokens (keeps prompts bounded)


@dataclass
class RetrievalSettings:
    """How a retrieval-augmented captioner reads its prompt; saved in its config.json as "retrieval"."""

    k: int = 4  # retrieved captions per image
    prompt_format: str = PROMPT_FORMAT
    datastore: str = ""  # the datastore the model was trained with (the default at inference)
    max_caption_tokens: int = MAX_PROMPT_CAPTION_TOKENS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RetrievalSettings | None:
        return cls(**data) if data else None


def format_prompt(captions: list[str], prompt_format: str = PROMPT_FORMAT) -> str:
    """['a red circle', 'a blue square'] -> 'Similar images show: a red circle. a blue square. This image shows'."""
    joined = " ".join(c.strip().rstrip(".") + "." for c in captions)
    return prompt_format.format(captions=joined)


def prompt_tokens(tokenizer, captions: list[str], settings: RetrievalSettings) -> list[int]:
    """The prompt's token ids (no special tokens); each caption cut to settings.max_caption_tokens tokens."""
    cut = []
    for c in captions:
        ids = tokenizer(c.strip().rstrip("."), add_special_tokens=False)["input_ids"]
        cut.append(tokenizer.decode(ids[:settings.max_caption_tokens]) if len(ids) > settings.max_caption_tokens
                   else c)
    return list(tokenizer(format_prompt(cut, settings.prompt_format), add_special_tokens=False)["input_ids"])


def prompted_targets(prompts: list[list[int]], captions: list[list[int]]):
    """Per row [prompt ; caption] right-padded -> (tokens (B, T), mask (B, T), target_mask (B, T)) int64 arrays.

    mask is 1 on every real token (the LM attends to prompt and caption); target_mask only on the
    caption tokens, the ones the loss is taken on.
    """
    import numpy as np

    longest = max(len(p) + len(c) for p, c in zip(prompts, captions))
    tokens = np.zeros((len(prompts), longest), np.int64)  # pad id is irrelevant: masked out
    mask = np.zeros_like(tokens)
    target = np.zeros_like(tokens)
    for i, (p, c) in enumerate(zip(prompts, captions)):
        tokens[i, :len(p)], tokens[i, len(p):len(p) + len(c)] = p, c
        mask[i, :len(p) + len(c)] = 1
        target[i, len(p):len(p) + len(c)] = 1
    return tokens, mask, target


def prompted_inputs(lm, prefix, prompts: list[list[int]]):
    """Generation inputs: per row [pad ; prefix (K) ; prompt] left-padded (generate continues at the end).

    prefix (B, K, D) -> (inputs_embeds (B, L, D), attention_mask (B, L)) with L = K + the longest prompt.
    `generate` derives position ids from the attention mask, so a row's prefix starts at position 0
    as in training (where rows are right-padded).
    """
    import torch

    b, k, d = prefix.shape
    longest = max((len(p) for p in prompts), default=0)
    embed = lm.get_input_embeddings()
    inputs = prefix.new_zeros(b, k + longest, d)  # (B, L, D)
    attention = torch.zeros(b, k + longest, dtype=torch.long, device=prefix.device)
    for i, p in enumerate(prompts):
        start = longest - len(p)
        inputs[i, start:start + k] = prefix[i]
        if p:
            ids = torch.tensor(p, dtype=torch.long, device=prefix.device)
            inputs[i, start + k:] = embed(ids).to(prefix.dtype)  # (P, D)
        attention[i, start:] = 1
    return inputs, attention
