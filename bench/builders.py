"""Full-size architectures with random weights, built offline: CLIP ViT-B/32 and GPT-2 small.

Their speed does not depend on the weight values, so random weights give honest timings. The
tokenizer is a byte-level BPE trained on a small caption corpus and then filled up with extra
(never-merged, but decodable) byte-level entries to exactly GPT-2's 50,257 ids, so the LM head has
GPT-2's real size and anything the random LM generates can be decoded.
"""

from __future__ import annotations

import itertools
import string
from pathlib import Path

from bench.common import WORK

GPT2_VOCAB = 50257  # GPT-2 small's vocabulary = its LM head's output width
CLIP_DIR = WORK / "models" / "clip-vit-b32-random"
GPT2_DIR = WORK / "models" / "gpt2-small-random"


def _filler_tokens(count: int, taken: set[str]) -> list[str]:
    """Distinct strings made only of byte-level alphabet characters (so they decode cleanly)."""
    letters = string.ascii_lowercase
    out: list[str] = []
    for width in itertools.count(3):
        for combo in itertools.product(letters, repeat=width):
            tok = "Ġ" + "".join(combo)  # "Ġ" is the byte-level space: decodes to " xyz"
            if tok not in taken:
                out.append(tok)
                if len(out) == count:
                    return out


def build_gpt2_small(path: str | Path = GPT2_DIR, seed: int = 0) -> Path:
    """Random GPT-2 small (12 layers, width 768, 12 heads, 1024 positions, vocab 50257) + tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from prefixcap.demo.tiny_models import default_corpus, train_byte_bpe

    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    vocab, merges = train_byte_bpe(default_corpus(), vocab_size=1000)
    for tok in _filler_tokens(GPT2_VOCAB - len(vocab), set(vocab)):
        vocab[tok] = len(vocab)
    assert len(vocab) == GPT2_VOCAB
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    config = GPT2Config(vocab_size=GPT2_VOCAB, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_clip_vit_b32(path: str | Path = CLIP_DIR, seed: int = 0) -> Path:
    """Random CLIP ViT-B/32: vision tower 224px, patch 32, width 768, 12 layers, projection 512.

    The text tower has CLIP's real shape (width 512, 12 layers) but a small trained vocabulary;
    the benchmarks only time the vision tower.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from prefixcap.demo.tiny_models import build_clip_tokenizer

    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(vocab_size=1000, max_length=77)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=8, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision_config = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=512)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    # OpenAI's preprocessing: bicubic resize of the shortest edge to 224, centre crop, CLIP mean/std.
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(build_gpt2_small())
    print(build_clip_vit_b32())
