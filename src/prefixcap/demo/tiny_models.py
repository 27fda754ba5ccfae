"""Build tiny CLIP / GPT-2 / T5 models with real tokenizers locally, offline (tests and the demo)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle", "in the centre"]
OPENERS = ["a", "one", "there is a", "a picture of a", "an image with a", "a photo of a"]
SIZES = ["", "small ", "big ", "large ", "tiny "]


def default_corpus() -> list[str]:
    """Caption-like sentences plus ASCII so the tokenizers cover everyday English text."""
    lines = [
        f"{o} {s}{c} {sh} {p}."
        for o, s, c, sh, p in itertools.product(OPENERS, SIZES, COLOURS, SHAPES, PLACES)
    ]
    lines += [
        "A man riding a wave on top of a surfboard!",
        "Two dogs are playing with a frisbee in the park.",
        "A plate of food with broccoli, rice and meat?",
        "The quick brown fox jumps over the lazy dog 0123456789.",
        "A photo depicts a cat sitting on a laptop keyboard; it's sunny outside.",
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ !\"#$%&'()*+,-./:;<=>?@[]^_`{|}~",
    ]
    return lines


def train_byte_bpe(corpus: Iterable[str], vocab_size: int = 512, special_tokens: list[str] | None = None):
    """A byte-level BPE model trained on corpus; returns (vocab dict, list of merge pairs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens or ["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def build_tiny_gpt2(path: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 512,
                    n_embd: int = 32, n_layer: int = 2, n_head: int = 2, n_positions: int = 128, seed: int = 0) -> Path:
    """A random tiny GPT2LMHeadModel with a real byte-level BPE GPT2Tokenizer, saved to path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    path = Path(path)
    vocab, merges = train_byte_bpe(corpus or default_corpus(), vocab_size)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_t5(path: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 400,
                  d_model: int = 32, num_layers: int = 2, num_heads: int = 2, seed: int = 0) -> Path:
    """A random tiny T5ForConditionalGeneration with a trained Unigram T5Tokenizer, saved to path."""
    import torch
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    path = Path(path)
    spm = SentencePieceUnigramTokenizer()
    spm.train_from_iterator(list(corpus or default_corpus()), vocab_size=vocab_size,
                            special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False)
    pieces = [(p, float(s)) for p, s in json.loads(spm.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_model * 2,
        num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_clip_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512, max_length: int = 32):
    """A byte-level BPE tokenizer framed like CLIP's: <|startoftext|> text <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab, merges = train_byte_bpe(corpus or default_corpus(), vocab_size, special_tokens=[eos, bos])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, model_max_length=max_length
    )


def build_tiny_clip(path: str | Path, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                    projection_dim: int = 16, num_layers: int = 2, num_heads: int = 2,
                    corpus: Iterable[str] | None = None, seed: int = 0) -> Path:
    """A random tiny CLIPModel with its image processor and a CLIP-framed tokenizer, saved to path."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    tokenizer = build_clip_tokenizer(corpus)
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
        intermediate_size=hidden_size * 2, num_hidden_layers=num_layers, num_attention_heads=num_heads,
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
