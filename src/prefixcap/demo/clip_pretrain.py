"""Train a tiny CLIP contrastively on (image, caption) pairs for a time budget, and probe it linearly.

No pretrained CLIP can be downloaded offline, and a random-init CLIP's image embedding keeps colour
but loses shape and position (a transformer with random weights mostly averages its patches). A
minute of contrastive training on the demo's own pairs fixes that. The result is an ordinary local
model folder (CLIPModel weights + image processor + tokenizer) that `encoders.load_encoder(folder)`
loads like any Hugging Face CLIP.

`probe_attributes` measures what an encoder's image embedding keeps: a logistic-regression probe per
attribute, trained on frozen embeddings of training images and scored on held-out ones.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PRETRAIN_FILE = "clip_pretrain.json"  # written last in the model folder: the run's config and result
ATTRIBUTE_NAMES = ("colour", "shape", "position", "size")


@dataclass(frozen=True)
class ClipPretrainConfig:
    """Model shape (as tiny_models.build_tiny_clip takes it) and the training budget."""

    time_budget_s: float = 60.0  # training stops at the first step past it ...
    max_steps: int | None = None  # ... or after this many steps (set it for a reproducible run)
    # Measured on the synthetic shapes (docs/synthetic_and_clip_pretrain.md): at 3e-3 (or batch 64)
    # position stops being readable for a few hundred steps; 2e-3 keeps it. Patch 8 runs ~3x more
    # steps per second than patch 4.
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    projection_dim: int = 32
    num_layers: int = 2
    num_heads: int = 4
    seed: int = 0
    num_threads: int | None = None  # torch.set_num_threads; None leaves torch's choice
    # Pairs with the same group (by default the same caption text) count as positives of each other,
    # so duplicates in a batch are not pushed apart as if they were different content.
    group_positives: bool = True


@dataclass
class ClipPretrainResult:
    """What a pretraining run did."""

    path: str
    steps: int
    seconds: float  # training loop only
    prepare_seconds: float  # building the model and preprocessing the pairs
    pairs: int
    first_loss: float
    final_loss: float  # mean of the last 10 steps
    losses: list[float] = field(default_factory=list, repr=False)


def _set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)


def _image_processor(folder: str | Path):
    from transformers import AutoImageProcessor

    from prefixcap.model.encoders import _image_processor_kwargs

    return AutoImageProcessor.from_pretrained(str(folder), **_image_processor_kwargs())


def preprocess_images(processor, images: Sequence[Image.Image], chunk: int = 512) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float32 pixels with the encoder's own resize/crop/normalise."""
    from prefixcap.data.images import to_rgb

    parts = []
    for start in range(0, len(images), chunk):
        batch = [to_rgb(im) for im in images[start:start + chunk]]
        parts.append(torch.as_tensor(np.asarray(processor(images=batch, return_tensors="np")["pixel_values"],
                                                dtype=np.float32)))
    return torch.cat(parts) if parts else torch.empty(0, 3, 0, 0)  # (N, 3, H, W)


def _group_ids(groups: Sequence[Hashable]) -> torch.Tensor:
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in groups], dtype=torch.long)  # (N,)


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss); with groups, every same-group pair is a positive (soft targets)."""
    image_embeds = F.normalize(image_embeds, dim=-1)  # (B, C)
    text_embeds = F.normalize(text_embeds, dim=-1)  # (B, C)
    logits = logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T  # (B, B) image -> text
    if groups is None:
        targets = torch.eye(len(logits), device=logits.device)
    else:
        targets = (groups[:, None] == groups[None, :]).float()  # (B, B)
    targets = targets / targets.sum(dim=1, keepdim=True)  # symmetric, so rows = columns
    loss_i = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t = torch.sum(-targets * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return (loss_i + loss_t) / 2


def _lr_factor(step: int, config: ClipPretrainConfig, expected_steps: int) -> float:
    # Linear warm-up then cosine decay over the steps we expect to fit in the budget.
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, expected_steps - config.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_clip(images: Sequence[Image.Image], captions: Sequence[str], out_dir: str | Path,
                  config: ClipPretrainConfig = ClipPretrainConfig(), groups: Sequence[Hashable] | None = None,
                  progress: bool = True) -> ClipPretrainResult:
    """Build a random tiny CLIP, train it on the pairs, save it to out_dir (replacing it atomically).

    groups: one label per pair; pairs with equal labels are positives of each other (default: the
    caption text). The tokenizer is trained on the captions plus the default English corpus.
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer, CLIPModel

    from prefixcap.demo.tiny_models import build_tiny_clip, default_corpus

    if len(images) != len(captions):
        raise ValueError(f"pretrain_clip: {len(images)} images but {len(captions)} captions; expected one each")
    if len(images) < 2:
        raise ValueError(f"pretrain_clip: needs at least 2 (image, caption) pairs, got {len(images)}")
    if groups is not None and len(groups) != len(images):
        raise ValueError(f"pretrain_clip: {len(groups)} groups for {len(images)} pairs; expected one each")
    _set_threads(config.num_threads)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t_prepare = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build_tiny_clip(work, image_size=config.image_size, patch_size=config.patch_size,
                        hidden_size=config.hidden_size, projection_dim=config.projection_dim,
                        num_layers=config.num_layers, num_heads=config.num_heads,
                        corpus=list(default_corpus()) + sorted(set(captions)), seed=config.seed)
        model = CLIPModel.from_pretrained(str(work), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(work))
        pixels = preprocess_images(_image_processor(work), images)  # (N, 3, H, W)
        text = tokenizer(list(captions), padding=True, truncation=True,
                         max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        group_ids = _group_ids(list(groups) if groups is not None else list(captions)) if config.group_positives else None
        prepare_seconds = time.perf_counter() - t_prepare

        result = _train(model, pixels, text["input_ids"], text["attention_mask"], group_ids, config, progress, tqdm)
        result.prepare_seconds = prepare_seconds
        result.pairs = len(images)

        model.save_pretrained(str(work))  # overwrites the random weights; processor/tokenizer stay
        result.path = str(out_dir)
        info = {"config": asdict(config), "result": {k: v for k, v in asdict(result).items() if k != "losses"}}
        (work / PRETRAIN_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return result


def _train(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           group_ids: torch.Tensor | None, config: ClipPretrainConfig, progress: bool, tqdm) -> ClipPretrainResult:
    n = len(pixels)
    batch_size = min(config.batch_size, n)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    expected_steps = config.max_steps or 10**9  # refined after the first steps from the measured speed
    bar = tqdm(total=config.max_steps, desc="clip pretrain", unit="step", disable=not progress)
    perm, cursor, step = torch.randperm(n, generator=generator), 0, 0
    while True:
        elapsed = time.perf_counter() - start
        if config.max_steps is not None and step >= config.max_steps:
            break
        if config.max_steps is None and elapsed >= config.time_budget_s:
            break
        if step == 5 and config.max_steps is None:
            expected_steps = max(config.warmup_steps + 1, int(config.time_budget_s / (elapsed / 5)))
        if cursor + batch_size > n:
            perm, cursor = torch.randperm(n, generator=generator), 0
        idx = perm[cursor:cursor + batch_size]
        cursor += batch_size
        for g in optimizer.param_groups:
            g["lr"] = config.learning_rate * _lr_factor(step, config, expected_steps)
        image_embeds = model.get_image_features(pixel_values=pixels[idx])  # (B, C)
        text_embeds = model.get_text_features(input_ids=input_ids[idx], attention_mask=attention_mask[idx])
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        loss = contrastive_loss(image_embeds, text_embeds, model.logit_scale,
                                group_ids[idx] if group_ids is not None else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", pairs_per_s=f"{step * batch_size / max(elapsed, 1e-9):.0f}")
    bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    return ClipPretrainResult(path="", steps=step, seconds=seconds, prepare_seconds=0.0, pairs=n,
                              first_loss=losses[0] if losses else float("nan"),
                              final_loss=float(np.mean(losses[-10:])) if losses else float("nan"), losses=losses)


def load_pretrain_info(folder: str | Path) -> dict | None:
    """The config and result a pretrained folder was made with, or None if it is not complete."""
    path = Path(folder) / PRETRAIN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Linear probe


def embed_images(encoder, images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
    """Frozen image embeddings (N, C) of PIL images through an encoders.load_encoder encoder."""
    processor = getattr(encoder, "image_processor", None)  # HF: one batched call is ~2x faster
    preprocess = encoder.preprocessor()
    parts = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if processor is not None:
            pixels = preprocess_images(processor, chunk, chunk=batch_size)  # (b, 3, H, W)
        else:
            pixels = torch.as_tensor(np.stack([preprocess(im) for im in chunk]))  # (b, 3, H, W)
        parts.append(encoder.encode_pixels(pixels).cpu())  # (b, C)
    return torch.cat(parts)  # (N, C)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: Sequence[Hashable], test_x: torch.Tensor,
                          test_y: Sequence[Hashable], weight_decay: float = 1e-4, steps: int = 100) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted (L-BFGS, full batch) on train_x."""
    classes = sorted(set(train_y) | set(test_y), key=str)
    index = {c: i for i, c in enumerate(classes)}
    ytr = torch.tensor([index[y] for y in train_y])
    yte = torch.tensor([index[y] for y in test_y])
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)  # standardise: probe scale-free
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std  # (N, C)
    linear = torch.nn.Linear(xtr.shape[1], len(classes))
    torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)  # deterministic start
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(xtr), ytr) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float((linear(xte).argmax(1) == yte).float().mean())


def probe_attributes(encoder, train: Sequence[tuple[Image.Image, Sequence[str]]],
                     test: Sequence[tuple[Image.Image, Sequence[str]]],
                     names: Sequence[str] = ATTRIBUTE_NAMES) -> dict[str, float]:
    """Linear-probe accuracy per attribute: fit on train's embeddings, score on test's.

    encoder: a loaded encoder or a model name/folder for load_encoder. train/test: (image,
    attributes) pairs, attributes in the order of names (synthetic.Attributes fits).
    """
    from prefixcap.model.encoders import load_encoder

    if isinstance(encoder, (str, Path)):
        encoder = load_encoder(str(encoder))
    xtr = embed_images(encoder, [im for im, _ in train])
    xte = embed_images(encoder, [im for im, _ in test])
    return {name: linear_probe_accuracy(xtr, [a[i] for _, a in train], xte, [a[i] for _, a in test])
            for i, name in enumerate(names)}


def chance_levels(labels: Sequence[Sequence[str]], names: Sequence[str] = ATTRIBUTE_NAMES) -> dict[str, float]:
    """Accuracy of always guessing the most frequent value, per attribute."""
    out = {}
    for i, name in enumerate(names):
        values = [a[i] for a in labels]
        out[name] = max(values.count(v) for v in set(values)) / max(len(values), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m prefixcap.demo.clip_pretrain SHARDS... --out DIR: pretrain a tiny CLIP on webdataset pairs."""
    import argparse

    from prefixcap.demo.synthetic import read_shards

    parser = argparse.ArgumentParser(prog="python -m prefixcap.demo.clip_pretrain", description=main.__doc__)
    parser.add_argument("shards", nargs="+", help="webdataset .tar shards with {key}.jpg/.png and {key}.txt")
    parser.add_argument("--out", required=True, help="model folder to write (replaced if it exists)")
    defaults = ClipPretrainConfig()
    parser.add_argument("--time_budget_s", type=float, default=defaults.time_budget_s)
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num_threads", type=int, default=None)
    args = parser.parse_args(argv)
    config = ClipPretrainConfig(time_budget_s=args.time_budget_s, max_steps=args.max_steps,
                                batch_size=args.batch_size, seed=args.seed, num_threads=args.num_threads)
    samples = list(read_shards(args.shards))
    result = pretrain_clip([s.image for s in samples], [s.caption for s in samples], args.out, config)
    print(f"tiny CLIP trained on {result.pairs} pairs: {result.steps} steps in {result.seconds:.1f} s, "
          f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}; saved to {result.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
