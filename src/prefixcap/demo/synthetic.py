"""A seeded synthetic captioning dataset (coloured shapes at positions) written as webdataset shards.

Every image shows one shape; its colour, shape, position and size are drawn from a seeded generator
and the captions are fully determined by them, only the wording varies ("a red circle on the left",
"at the top, there is a small blue triangle"). `caption_attributes` parses any caption back to its
(colour, shape, position) triple, so the demo can score whether a predicted caption is right.

On disk (`write_dataset`):
  {out}/train/train-00000.tar ...   samples {key}.jpg (or .png), {key}.txt, {key}.json
  {out}/test/test-00000.tar ...     held-out split, drawn from an independent stream of the same seed
  {out}/dataset.json                written last: config, counts and shard lists (the dataset is
                                    complete exactly when it exists; a rerun with the same config
                                    reuses it, another config replaces the shards)
A sample's json holds the attributes, its `caption` (same as the .txt) and `captions`: several
wordings of the same content, usable as evaluation references.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from prefixcap.demo.tiny_models import COLOURS, SHAPES

DATASET_FILE = "dataset.json"
SPLITS = ("train", "test")
FORMAT_VERSION = 1

# RGB of every colour name the drawer knows; the background is a mid grey so white and black show.
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (240, 220, 30),
    "purple": (140, 50, 190), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15),
}
BACKGROUND = (120, 120, 120)
POSITIONS = ("left", "right", "top", "bottom", "centre")
SIZES = ("small", "big")
# Shape centre per position as a fraction of the image side (x, y).
POSITION_XY: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "centre": (0.5, 0.5),
}
SIZE_RADIUS: dict[str, float] = {"small": 0.12, "big": 0.2}  # fraction of the image side
JITTER = 0.06  # max shift of the centre, fraction of the side: the split is not a lookup table
SUPERSAMPLE = 4  # draw larger and downsample, for anti-aliased edges

# Wordings. Each maps an attribute value to the phrases that may express it.
PLACE_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side"), "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the middle", "in the centre"),
}
SIZE_PHRASES: dict[str, tuple[str, ...]] = {"small": ("small", "tiny"), "big": ("big", "large")}
OPENERS = ("a", "one", "there is a", "a picture of a", "an image with a", "a photo of a")

# Parsing vocabulary: word -> attribute value (plurals and spelling variants included).
COLOUR_WORDS: dict[str, str] = {c: c for c in COLOURS} | {c: c for c in RGB} | {"gray": "grey", "grey": "grey", "violet": "purple"}
SHAPE_WORDS: dict[str, str] = {s: s for s in SHAPES} | {f"{s}s": s for s in SHAPES} | {
    "crosses": "cross", "stars": "star", "disc": "circle", "disk": "circle",
}
POSITION_WORDS: dict[str, str] = {
    "left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
    "middle": "centre", "centre": "centre", "center": "centre", "central": "centre",
}
SIZE_WORDS: dict[str, str] = {"small": "small", "tiny": "small", "little": "small",
                              "big": "big", "large": "big", "huge": "big"}


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate; the same config and seed always give the same bytes."""

    num_train: int = 4000
    num_test: int = 200
    image_size: int = 64
    seed: int = 0
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    positions: tuple[str, ...] = POSITIONS
    sizes: tuple[str, ...] = SIZES
    captions_per_image: int = 1  # samples written per image, each with another wording
    references_per_image: int = 5  # wordings stored in the json `captions` list
    samples_per_shard: int = 1000
    image_format: str = "jpg"  # "jpg" or "png"
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        for name, values, known in (("colours", self.colours, RGB), ("shapes", self.shapes, DRAWERS),
                                    ("positions", self.positions, POSITION_XY), ("sizes", self.sizes, SIZE_RADIUS)):
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise ValueError(f"SyntheticConfig.{name}={values!r}: expected a non-empty subset of {list(known)}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"SyntheticConfig.image_format={self.image_format!r}: expected 'jpg' or 'png'")
        if self.image_size < 16 or self.captions_per_image < 1 or self.references_per_image < 1:
            raise ValueError("SyntheticConfig: image_size >= 16, captions_per_image >= 1 and "
                             "references_per_image >= 1 are required")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SyntheticConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class Attributes(NamedTuple):
    """What an image shows; `triple` is what a caption must get right."""

    colour: str
    shape: str
    position: str
    size: str

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


@dataclass
class SyntheticSample:
    """One generated image with its captions (the first is the sample's caption)."""

    key: str
    image: Image.Image
    attributes: Attributes
    captions: list[str] = field(default_factory=list)
    image_id: int = 0

    @property
    def caption(self) -> str:
        return self.captions[0]


# ---------------------------------------------------------------------------------------------
# Drawing


def _circle(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill) -> None:
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _square(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill) -> None:
    h = r * 0.85  # about the circle's area, so size is not a shape cue
    draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)


def _triangle(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill) -> None:
    R = r * 1.15
    pts = [(x + R * np.cos(a), y + R * np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    draw.polygon(pts, fill=fill)


def _star(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill) -> None:
    R = r * 1.15
    pts = [(x + (R if i % 2 == 0 else R * 0.45) * np.cos(a), y + (R if i % 2 == 0 else R * 0.45) * np.sin(a))
           for i, a in enumerate(np.deg2rad(np.arange(-90, 270, 36)))]
    draw.polygon(pts, fill=fill)


def _cross(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill) -> None:
    w = r * 0.38
    draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
    draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)


DRAWERS = {"circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "cross": _cross}


def draw_image(attributes: Attributes, size: int = 64, offset: tuple[float, float] = (0.0, 0.0),
               scale: float = 1.0) -> Image.Image:
    """An RGB image of one shape; offset (fractions of the side) and scale jitter its placement."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    fx, fy = POSITION_XY[attributes.position]
    x, y = (fx + offset[0]) * big, (fy + offset[1]) * big
    DRAWERS[attributes.shape](ImageDraw.Draw(image), x, y, SIZE_RADIUS[attributes.size] * scale * big,
                              RGB[attributes.colour])
    return image.reduce(SUPERSAMPLE)  # box filter: anti-aliased and ~10x faster than LANCZOS


# ---------------------------------------------------------------------------------------------
# Captions


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]  # rng.choice on a tuple is ~10x slower


def _with_article(opener: str, next_word: str) -> str:
    # "a orange" -> "an orange"; only the final article of the opener changes.
    if (opener.endswith(" a") or opener == "a") and next_word[0] in "aeiou":
        return opener[:-1] + "an"
    return opener


def make_caption(attributes: Attributes, rng: np.random.Generator) -> str:
    """One random wording of the attributes (the size is mentioned or left out at random)."""
    size = ""
    if rng.random() < 0.5:
        size = _pick(rng, SIZE_PHRASES[attributes.size]) + " "
    noun = f"{size}{attributes.colour} {attributes.shape}"
    place = _pick(rng, PLACE_PHRASES[attributes.position])
    if rng.random() < 0.25:
        return f"{place}, there is {_with_article('a', noun)} {noun}"
    opener = _pick(rng, OPENERS)
    return f"{_with_article(opener, noun)} {noun} {place}"


def make_captions(attributes: Attributes, count: int, rng: np.random.Generator, tries: int = 50) -> list[str]:
    """count distinct wordings where possible (duplicates only once the wordings run out)."""
    captions: list[str] = []
    for _ in range(tries * count):
        caption = make_caption(attributes, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            return captions
    while len(captions) < count:
        captions.append(make_caption(attributes, rng))
    return captions


def _unique_value(words: list[str], vocabulary: dict[str, str]) -> str | None:
    values = {vocabulary[w] for w in words if w in vocabulary}
    return values.pop() if len(values) == 1 else None  # none or contradictory -> unknown


def caption_attributes(caption: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, position) named by a caption, any wording; None where missing or contradictory."""
    words = re.findall(r"[a-z]+", caption.lower())
    return (_unique_value(words, COLOUR_WORDS), _unique_value(words, SHAPE_WORDS),
            _unique_value(words, POSITION_WORDS))


def caption_size(caption: str) -> str | None:
    """'small' / 'big' if the caption names the size unambiguously, else None."""
    return _unique_value(re.findall(r"[a-z]+", caption.lower()), SIZE_WORDS)


def attributes_correct(caption: str, truth: Attributes | Sequence[str]) -> bool:
    """True when the caption names exactly the true colour, shape and position."""
    triple = truth.triple if isinstance(truth, Attributes) else tuple(truth)[:3]
    return caption_attributes(caption) == triple


def attribute_accuracy(captions: Sequence[str], truths: Sequence[Attributes | Sequence[str]]) -> dict[str, float]:
    """Share of captions with the right colour, shape, position, and all three together."""
    if len(captions) != len(truths):
        raise ValueError(f"attribute_accuracy: {len(captions)} captions but {len(truths)} true attribute sets")
    n = max(len(captions), 1)
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    for caption, truth in zip(captions, truths):
        true = truth.triple if isinstance(truth, Attributes) else tuple(truth)[:3]
        got = caption_attributes(caption)
        for name, g, t in zip(("colour", "shape", "position"), got, true):
            hits[name] += g == t
        hits["all"] += got == true
    return {k: v / n for k, v in hits.items()}


# ---------------------------------------------------------------------------------------------
# Generation


def _split_rng(seed: int, split: str) -> np.random.Generator:
    # Independent streams per split: the test split does not change when num_train does.
    return np.random.default_rng([seed, SPLITS.index(split)])


def generate_samples(config: SyntheticConfig, split: str) -> Iterator[SyntheticSample]:
    """The split's samples in order (captions_per_image samples per image), fully determined by the seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    rng = _split_rng(config.seed, split)
    count = config.num_train if split == "train" else config.num_test
    for image_id in range(count):
        attrs = Attributes(_pick(rng, config.colours), _pick(rng, config.shapes),
                           _pick(rng, config.positions), _pick(rng, config.sizes))
        offset = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
        scale = float(rng.uniform(0.9, 1.1))
        image = draw_image(attrs, config.image_size, offset, scale)
        n_caps = max(config.references_per_image, config.captions_per_image)
        captions = make_captions(attrs, n_caps, rng)
        for j in range(config.captions_per_image):
            # Rotate so each sample's own caption comes first, the others stay as references.
            own = captions[j:] + captions[:j]
            key = f"{split}_{image_id:06d}" + (f"_{j}" if config.captions_per_image > 1 else "")
            yield SyntheticSample(key=key, image=image, attributes=attrs,
                                  captions=own[:max(config.references_per_image, 1)], image_id=image_id)


def encode_image(image: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def sample_record(sample: SyntheticSample, config: SyntheticConfig) -> dict[str, bytes | str]:
    """The webdataset record of a sample: image bytes, caption text, attribute json."""
    meta = {**sample.attributes._asdict(), "caption": sample.caption, "captions": sample.captions,
            "image_id": sample.image_id}
    return {
        "__key__": sample.key,
        config.image_format: encode_image(sample.image, config.image_format, config.jpeg_quality),
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _write_tar(path: Path, records: list[dict]) -> None:
    import webdataset as wds

    tmp = path.with_name(f".{path.name}.tmp")
    # mtime fixed: the same config writes byte-identical tars.
    with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0.0) as writer:
        for record in records:
            writer.write(record)
    tmp.replace(path)


def _clear_split(folder: Path, split: str) -> None:
    # Remove only files this module writes, so a folder the user pointed at is not wiped.
    for path in list(folder.glob(f"{split}-*.tar")) + list(folder.glob(f".{split}-*.tar.tmp")):
        path.unlink()


def write_split(out_dir: str | Path, config: SyntheticConfig, split: str, progress: bool = True) -> list[str]:
    """Write one split as shards {out}/{split}/{split}-NNNNN.tar; returns their paths relative to out."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    _clear_split(folder, split)
    total = (config.num_train if split == "train" else config.num_test) * config.captions_per_image
    shards: list[str] = []
    records: list[dict] = []

    def flush() -> None:
        path = folder / f"{split}-{len(shards):05d}.tar"
        _write_tar(path, records)
        shards.append(str(path.relative_to(out_dir)))
        records.clear()

    bar = tqdm(total=total, desc=f"synthetic {split}", unit="img", disable=not progress)
    for sample in generate_samples(config, split):
        records.append(sample_record(sample, config))
        bar.update(1)
        if len(records) == config.samples_per_shard:
            flush()
    if records or not shards:
        flush()
    bar.close()
    return shards


@dataclass
class SyntheticDataset:
    """A written dataset: where it is and what it holds."""

    root: Path
    config: SyntheticConfig
    shards: dict[str, list[str]]  # split -> shard paths relative to root
    counts: dict[str, int]  # split -> number of samples
    seconds: float = 0.0  # time spent generating (0 when reused)
    reused: bool = False

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s) for s in self.shards[split]]


def load_dataset_info(out_dir: str | Path) -> SyntheticDataset | None:
    """The dataset described by {out}/dataset.json, or None when there is no complete one."""
    root = Path(out_dir)
    path = root / DATASET_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        config = SyntheticConfig.from_json(data["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a prefixcap synthetic dataset description ({err})") from err
    if not all((root / s).is_file() for split in SPLITS for s in data["shards"][split]):
        return None
    return SyntheticDataset(root, config, data["shards"], data["counts"], reused=True)


def write_dataset(out_dir: str | Path, config: SyntheticConfig = SyntheticConfig(), progress: bool = True,
                  overwrite: bool = False) -> SyntheticDataset:
    """Write train and test shards plus dataset.json; reuse a complete dataset with the same config."""
    from prefixcap.data.shards import atomic_write_json

    root = Path(out_dir)
    existing = load_dataset_info(root)
    if existing is not None and existing.config == config and not overwrite:
        return existing
    (root / DATASET_FILE).unlink(missing_ok=True)  # incomplete until rewritten last
    start = time.perf_counter()
    shards = {split: write_split(root, config, split, progress) for split in SPLITS}
    counts = {"train": config.num_train * config.captions_per_image, "test": config.num_test * config.captions_per_image}
    seconds = time.perf_counter() - start
    atomic_write_json(root / DATASET_FILE, {
        "format_version": FORMAT_VERSION, "config": config.to_json(), "shards": shards, "counts": counts,
        "images": {"train": config.num_train, "test": config.num_test},
        "vocabulary": {"colours": list(config.colours), "shapes": list(config.shapes),
                       "positions": list(config.positions), "sizes": list(config.sizes)},
    })
    return SyntheticDataset(root, config, shards, counts, seconds=seconds)


class ShardSample(NamedTuple):
    """A sample read back from a shard."""

    key: str
    image: Image.Image
    caption: str
    meta: dict


def read_shards(paths: Sequence[str | Path]) -> Iterator[ShardSample]:
    """Read samples back with the webdataset library, in order (no shuffling)."""
    import webdataset as wds

    urls = [str(p) for p in paths]
    for path in urls:
        if not Path(path).is_file():
            raise FileNotFoundError(f"webdataset shard {path} does not exist")
    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    for sample in pipeline:
        image_key = next((k for k in ("jpg", "png", "jpeg") if k in sample), None)
        if image_key is None or "txt" not in sample:
            raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: expected an image "
                             f"(.jpg/.png) and a .txt caption, found {sorted(k for k in sample if not k.startswith('_'))}")
        yield ShardSample(sample["__key__"], sample[image_key].convert("RGB"), sample["txt"], sample.get("json") or {})


def sample_attributes(meta: dict) -> Attributes:
    """The Attributes stored in a sample's json."""
    try:
        return Attributes(meta["colour"], meta["shape"], meta["position"], meta["size"])
    except KeyError as err:
        raise ValueError(f"sample json {meta!r} lacks the attribute {err}") from err


def main(argv: list[str] | None = None) -> int:
    """python -m prefixcap.demo.synthetic OUT [--num_train N] ...: write the dataset, print a summary."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m prefixcap.demo.synthetic", description=main.__doc__)
    parser.add_argument("out_dir")
    defaults = SyntheticConfig()
    parser.add_argument("--num_train", type=int, default=defaults.num_train)
    parser.add_argument("--num_test", type=int, default=defaults.num_test)
    parser.add_argument("--image_size", type=int, default=defaults.image_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--captions_per_image", type=int, default=defaults.captions_per_image)
    parser.add_argument("--image_format", choices=("jpg", "png"), default=defaults.image_format)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    config = SyntheticConfig(num_train=args.num_train, num_test=args.num_test, image_size=args.image_size,
                             seed=args.seed, captions_per_image=args.captions_per_image,
                             image_format=args.image_format)
    ds = write_dataset(args.out_dir, config, overwrite=args.overwrite)
    state = "reused" if ds.reused else f"written in {ds.seconds:.1f} s"
    print(f"synthetic dataset {ds.root}: {ds.counts['train']} train / {ds.counts['test']} test samples, "
          f"{len(ds.shards['train'])}+{len(ds.shards['test'])} shards ({state})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
