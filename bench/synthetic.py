"""Synthetic benchmark data: 640x480 JPEG webdataset shards and preprocessed caption datasets.

Caption lengths follow a COCO-like distribution (GPT-2 tokens incl. end-of-text: mean about 12,
standard deviation about 3.5, a long tail up to ~60), which is what decides how much padding the
original trainer's global pad length costs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import WORK

WORDS = ["a", "man", "woman", "dog", "cat", "plate", "of", "food", "sitting", "on", "top", "table", "next", "to", "street", "with", "two", "people", "riding", "wave", "surfboard", "bus", "train", "red", "blue", "green", "white", "large", "small", "standing", "in", "front", "group", "kitchen", "room", "bed", "field", "grass", "water", "sky", "building", "holding", "playing", "frisbee", "park", "tennis"]


def coco_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """(n,) token counts with COCO's shape: most captions 9-15 tokens, 1% long-tail up to ~60."""
    rng = np.random.default_rng(seed)
    core = np.rint(rng.lognormal(mean=np.log(11.3), sigma=0.2, size=n)).astype(np.int64)  # (n,)
    tail = rng.random(n) < 0.01
    core[tail] = rng.integers(22, 61, size=int(tail.sum()))
    return np.clip(core, 5, 64).astype(np.int32)


def _random_words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n))


def synthetic_jpeg(rng: np.random.Generator, width: int = 640, height: int = 480, quality: int = 90) -> bytes:
    """A photo-like JPEG (~100 KB at 640x480): smooth colour field, discs, sensor-like noise."""
    from PIL import Image, ImageDraw

    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height),
                                                                                       Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(12):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(10, 120))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(base).astype(np.int16) + rng.normal(0, 10, (height, width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_jpeg_shards(folder: str | Path, num_images: int, captions_per_image: int = 5,
                      images_per_tar: int = 64, seed: int = 0, images: Sequence[bytes] | None = None) -> list[str]:
    """webdataset tars of {key}.jpg + {key}.txt (first caption) + {key}.json {"captions": [...]}.

    Each sample gets a new 640x480 synthetic_jpeg, or, given `images`, the next of those JPEGs in turn (a
    few distinct ones made in parallel beforehand, when making thousands one by one would take too long).
    Reused when a `done.json` with the same settings exists. Returns the tar paths.
    """
    import hashlib

    import webdataset as wds

    folder = Path(folder)
    settings = {"num_images": num_images, "captions_per_image": captions_per_image,
                "images_per_tar": images_per_tar, "seed": seed}
    if images is not None:
        settings["images_sha1"] = hashlib.sha1(b"".join(images)).hexdigest()
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
        return json.loads(done.read_text())["tars"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tars: list[str] = []
    for start in range(0, num_images, images_per_tar):
        path = folder / f"{start // images_per_tar:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, min(start + images_per_tar, num_images)):
                captions = [_random_words(rng, int(rng.integers(8, 14))) for _ in range(captions_per_image)]
                jpeg = synthetic_jpeg(rng) if images is None else images[i % len(images)]
                sink.write({"__key__": f"{i:08d}", "jpg": jpeg, "txt": captions[0],
                            "json": json.dumps({"captions": captions}).encode()})
        tars.append(str(path))
    done.write_text(json.dumps({"settings": settings, "tars": tars}))
    return tars


def write_preprocessed(folder: str | Path, num_captions: int, manifest_extra: dict[str, Any],
                       captions_per_image: int = 5, embedding_dim: int = 512, vocab_low: int = 1,
                       vocab_high: int = 1000, eos: int = 0, captions_per_shard: int = 100_000,
                       seed: int = 0) -> Path:
    """A preprocessed dataset of random embeddings and COCO-like random token sequences.

    Shards go through prefixcap's own `write_shard`; the manifest is `manifest_extra` plus the
    counts, written last like the preprocess runner does. Reused when the manifest matches.
    """
    from prefixcap.data.shards import MANIFEST, Manifest, ShardContent, write_shard

    folder = Path(folder)
    signature = {"num_captions": num_captions, "captions_per_image": captions_per_image,
                 "embedding_dim": embedding_dim, "seed": seed, "vocab": [vocab_low, vocab_high, eos]}
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("bench_signature") == signature and all(old.get(k) == v for k, v in manifest_extra.items()):
            return folder
    rng = np.random.default_rng(seed)
    lengths = coco_like_lengths(num_captions, seed)
    shards, total_images = [], 0
    per_shard = captions_per_shard - captions_per_shard % captions_per_image
    for s, start in enumerate(range(0, num_captions, per_shard)):
        n = min(per_shard, num_captions - start)
        n_img = -(-n // captions_per_image)
        image_rows = (np.arange(n) // captions_per_image).tolist()
        flat = rng.integers(vocab_low, vocab_high, size=int(lengths[start:start + n].sum()), dtype=np.int32)
        ends = np.cumsum(lengths[start:start + n])
        flat[ends - 1] = eos  # every caption ends with end-of-text, as tokenize_caption makes it
        token_lists = [a.tolist() for a in np.split(flat, ends[:-1])]
        captions = [f"synthetic caption {start + i}" for i in range(n)]
        content = ShardContent(keys=[f"{total_images + i:09d}" for i in range(n_img)],
                               embeddings=rng.standard_normal((n_img, embedding_dim), dtype=np.float32),
                               image_rows=image_rows, captions=captions, tokens=token_lists)
        name = f"{s:05d}"
        stats = write_shard(folder, name, content, {"synthetic": True})
        shards.append(json.loads(Path(stats).read_text()))
        total_images += n_img
    Manifest.from_dict({**manifest_extra, "bench_signature": signature, "shards": shards, "num_captions": num_captions,
                        "num_images": total_images, "embedding_dim": embedding_dim}).write(folder)
    return folder


if __name__ == "__main__":
    lens = coco_like_lengths(100_000)
    print(f"mean {lens.mean():.2f} std {lens.std():.2f} max {lens.max()} "
          f"global pad {min(int(lens.mean() + 10 * lens.std()), int(lens.max()))}")
    print(sorted(WORK.glob("*")))
