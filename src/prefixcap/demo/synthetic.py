"""A seeded synthetic captioning dataset (coloured shapes at positions) written as webdataset shards.

Every image shows one shape (drawn and worded by `prefixcap.demo.shapes`); its colour, shape,
position and size are drawn from a seeded generator and the captions are fully determined by them,
only the wording varies.

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
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from prefixcap.demo.shapes import (DRAWERS, POSITION_XY, POSITIONS, RGB, SIZE_RADIUS, SIZES, Attributes, draw_image,
                                   make_captions, pick)

DATASET_FILE = "dataset.json"
SPLITS = ("train", "test")
FORMAT_VERSION = 1
JITTER = 0.06  # max shift of the centre, fraction of the side: the split is not a lookup table


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
        attrs = Attributes(pick(rng, config.colours), pick(rng, config.shapes),
                           pick(rng, config.positions), pick(rng, config.sizes))
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


def write_tar(path: Path, records: list[dict]) -> None:
    """Write webdataset records to one tar shard, atomically (a temporary file renamed into place)."""
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
        write_tar(path, records)
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
    from prefixcap.runs import atomic_write_json

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
