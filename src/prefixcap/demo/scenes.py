"""A harder synthetic captioning dataset: scenes of 2-3 shapes with sizes, colours and pairwise relations.

Each image is a 3 x 3 grid of cells holding 2 or 3 shapes (distinct colour+shape pairs, a size each).
The shapes are placed so that they form a chain in which consecutive shapes share a row or a column,
and the caption states the count and one relation per link of the chain:

    "three shapes: a small red circle left of a big blue square and the big blue square above a
     small green triangle"

The chain is read from its end that comes first in reading order; wording varies ("two
shapes"/"two objects", "left of"/"to the left of", "above"/"over", ...), the content does not. `score_caption` parses any such caption back and checks
it against the scene: count, the colour/shape/size multisets, and every stated relation against the
geometry (so "the square right of the circle" is as right as "the circle left of the square").

Held-out combinations: `SceneConfig.held_out` colour+shape pairs never occur in the training split;
a `held_out_share` of the test scenes contain one of them, the rest are drawn like training scenes.
Written as webdataset shards with dataset.json, exactly like prefixcap.demo.synthetic (same reader).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from prefixcap.demo.shapes import BACKGROUND, DRAWERS, RGB, SUPERSAMPLE, pick
from prefixcap.demo.synthetic import encode_image, write_tar

DATASET_FILE = "dataset.json"
SPLITS = ("train", "test")
FORMAT_VERSION = 1
GRID = 3
SIZE_RADIUS = {"small": 0.24, "big": 0.40}  # fraction of a cell's side
JITTER = 0.08  # max centre shift, fraction of a cell
COUNT_WORDS = {2: "two", 3: "three"}
COUNT_NOUNS = ("shapes", "objects")
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
    "above": ("above", "over"), "below": ("below", "under"),
}
RELATIONS = tuple(RELATION_PHRASES)
# Parsing vocabulary (longest phrases first, so "to the left of" is not read as "left of" plus "to the").
_RELATION_RE = re.compile(r"\b(to the left of|left of|to the right of|right of|above|over|below|under)\b")
_RELATION_OF = {p: r for r, phrases in RELATION_PHRASES.items() for p in phrases}
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "1": 1, "2": 2, "3": 3, "4": 4}


@dataclass(frozen=True)
class SceneConfig:
    """What to generate; the same config always gives the same bytes."""

    num_train: int = 3000
    num_test: int = 300
    image_size: int = 48  # 16-pixel cells: with the tiny CLIP's 8-pixel patches, 2 x 2 patches per cell
    seed: int = 0
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    sizes: tuple[str, ...] = ("small", "big")
    held_out: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
    held_out_share: float = 0.5  # of test scenes that contain a held-out colour+shape pair
    three_share: float = 0.5  # of scenes with three shapes (the rest have two)
    references_per_image: int = 5
    samples_per_shard: int = 1000
    image_format: str = "png"

    def __post_init__(self) -> None:
        for name, values, known in (("colours", self.colours, RGB), ("shapes", self.shapes, DRAWERS),
                                    ("sizes", self.sizes, SIZE_RADIUS)):
            if not values or any(v not in known for v in values):
                raise ValueError(f"SceneConfig.{name}={values!r}: expected a non-empty subset of {list(known)}")
        if len(self.colours) * len(self.shapes) - len(self.held_out) < 3:
            raise ValueError("SceneConfig: fewer than 3 colour+shape pairs are left for training scenes")
        if self.image_size < 24 or self.references_per_image < 1:
            raise ValueError("SceneConfig: image_size >= 24 and references_per_image >= 1 are required")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SceneConfig:
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v
        return cls(**{k: tup(v) for k, v in data.items()})


class SceneObject(NamedTuple):
    """One shape of a scene and its grid cell."""

    size: str
    colour: str
    shape: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass
class Scene:
    """A generated scene: objects in chain order (consecutive ones share a row or a column)."""

    objects: list[SceneObject]
    held_out: bool = False  # contains a held-out colour+shape pair

    def to_json(self) -> dict:
        return {"objects": [o._asdict() for o in self.objects], "held_out": self.held_out}

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        return cls([SceneObject(**o) for o in data["objects"]], bool(data.get("held_out", False)))


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where a is relative to b: a RELATIONS entry when they share a row or column, else None."""
    if a.row == b.row and a.col != b.col:
        return "left of" if a.col < b.col else "right of"
    if a.col == b.col and a.row != b.row:
        return "above" if a.row < b.row else "below"
    return None


# ---------------------------------------------------------------------------------------------
# Sampling scenes


def _chain_cells(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    """count distinct cells, each sharing a row or column with the previous one."""
    cells = [(int(rng.integers(GRID)), int(rng.integers(GRID)))]
    while len(cells) < count:
        r, c = cells[-1]
        options = [(r, j) for j in range(GRID) if (r, j) not in cells] + \
                  [(i, c) for i in range(GRID) if (i, c) not in cells]
        cells.append(options[int(rng.integers(len(options)))])
    return cells


def _pairs(config: SceneConfig, held_out: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(pairs allowed in the scene, held-out pairs) for a training-like or a held-out scene."""
    banned = set(config.held_out)
    allowed = [(c, s) for c in config.colours for s in config.shapes if (c, s) not in banned]
    return (allowed + sorted(banned) if held_out else allowed), sorted(banned)


def sample_scene(rng: np.random.Generator, config: SceneConfig, held_out: bool = False) -> Scene:
    """One scene; with held_out, exactly one of its objects has a held-out colour+shape pair."""
    count = 3 if rng.random() < config.three_share else 2
    cells = _chain_cells(rng, count)
    allowed, banned = _pairs(config, held_out)
    chosen: list[tuple[str, str]] = []
    if held_out:
        chosen.append(banned[int(rng.integers(len(banned)))])
    normal = [p for p in allowed if p not in banned]
    while len(chosen) < count:
        pair = normal[int(rng.integers(len(normal)))]
        if pair not in chosen:
            chosen.append(pair)
    order = rng.permutation(count)  # the held-out pair lands anywhere in the chain
    objects = [SceneObject(pick(rng, config.sizes), *chosen[int(k)], *cells[i]) for i, k in enumerate(order)]
    return Scene(objects, held_out)


# ---------------------------------------------------------------------------------------------
# Drawing and captions


def draw_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image of the scene (anti-aliased; centres jittered inside their cells)."""
    big = size * SUPERSAMPLE
    cell = big / GRID
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        x, y = (obj.col + 0.5 + dx) * cell, (obj.row + 0.5 + dy) * cell
        DRAWERS[obj.shape](draw, x, y, SIZE_RADIUS[obj.size] * cell, RGB[obj.colour])
    return image.reduce(SUPERSAMPLE)


def _article(noun_phrase: str, definite: bool) -> str:
    if definite:
        return f"the {noun_phrase}"
    return f"{'an' if noun_phrase[0] in 'aeiou' else 'a'} {noun_phrase}"


def make_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One wording: the chain read from its end that comes first in reading order (top row first, then
    left to right), one clause per link, a later mention with 'the'.

    A fixed reading order keeps the relation words a function of the image. With the chain read from
    a random end (the first design), "A left of B" and "B right of A" were equally likely, so the
    relation word depended on which object the LM had happened to name first; in a pilot every mapper
    stated relations correctly for only 0-3 % of scenes.
    """
    first, last = scene.objects[0], scene.objects[-1]
    chain = scene.objects if (first.row, first.col) < (last.row, last.col) else scene.objects[::-1]
    clauses, named = [], set()
    for a, b in zip(chain, chain[1:]):
        rel = relation(a, b)
        assert rel is not None, "consecutive scene objects share a row or column"
        left = _article(a.name, a.name in named)
        named.add(a.name)
        clauses.append(f"{left} {pick(rng, RELATION_PHRASES[rel])} {_article(b.name, False)}")
        named.add(b.name)
    return f"{COUNT_WORDS[len(chain)]} {pick(rng, COUNT_NOUNS)}: " + " and ".join(clauses)


def make_captions(scene: Scene, count: int, rng: np.random.Generator, tries: int = 40) -> list[str]:
    """count distinct wordings where possible."""
    captions: list[str] = []
    for _ in range(tries * count):
        caption = make_caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            break
    while len(captions) < count:
        captions.append(make_caption(scene, rng))
    return captions


# ---------------------------------------------------------------------------------------------
# Parsing and scoring


@dataclass
class ParsedCaption:
    """What a caption states: a count and relation clauses between (size, colour, shape) mentions."""

    count: int | None
    clauses: list[tuple[tuple[str | None, ...], str, tuple[str | None, ...]]] = field(default_factory=list)

    @property
    def mentions(self) -> set[tuple[str | None, ...]]:
        return {m for a, _, b in self.clauses for m in (a, b)}


def _mention(words: list[str], vocab: dict[str, set[str]]) -> tuple[str | None, ...]:
    found = []
    for name in ("size", "colour", "shape"):
        values = [w.rstrip("s") if name == "shape" else w for w in words]
        hits = [v for v in values if v in vocab[name]]
        found.append(hits[-1] if len(set(hits)) == 1 else None)
    return tuple(found)


def parse_caption(caption: str, vocab: dict[str, set[str]]) -> ParsedCaption:
    """Parse any wording of make_caption (and reasonable near-misses); unknown parts become None."""
    text = caption.lower().strip()
    head, _, body = text.partition(":")
    if not body:
        head, body = "", text
    count = next((_NUMBER_WORDS[w] for w in re.findall(r"[a-z0-9]+", head) if w in _NUMBER_WORDS), None)
    parsed = ParsedCaption(count)
    for clause in re.split(r"\band\b|,", body):
        match = _RELATION_RE.search(clause)
        if not match:
            continue
        left = re.findall(r"[a-z]+", clause[:match.start()])
        right = re.findall(r"[a-z]+", clause[match.end():])
        parsed.clauses.append((_mention(left, vocab), _RELATION_OF[match.group(1)], _mention(right, vocab)))
    return parsed


def scene_vocabulary(config: SceneConfig) -> dict[str, set[str]]:
    return {"size": set(config.sizes), "colour": set(config.colours), "shape": set(config.shapes)}


def _find(scene: Scene, mention: tuple[str | None, ...]) -> SceneObject | None:
    # Objects are told apart by colour+shape (unique in a scene), so a wrong size does not also
    # make the relation wrong: size is scored on its own.
    _, colour, shape = mention
    return next((o for o in scene.objects if (o.colour, o.shape) == (colour, shape)), None)


def score_caption(caption: str, scene: Scene, vocab: dict[str, set[str]]) -> dict[str, object]:
    """Per-caption correctness: count, colour/shape/size multisets, objects, each clause, relations, all."""
    parsed = parse_caption(caption, vocab)
    mentions = sorted(parsed.mentions, key=str)
    truth = scene.objects
    out: dict[str, object] = {"count": parsed.count == len(truth)}
    for i, name in enumerate(("size", "colour", "shape")):
        out[name] = sorted(str(m[i]) for m in mentions) == sorted(getattr(o, name) for o in truth)
    out["objects"] = set(mentions) == {(o.size, o.colour, o.shape) for o in truth}
    clauses = []
    for a, rel, b in parsed.clauses:
        oa, ob = _find(scene, a), _find(scene, b)
        clauses.append((rel, oa is not None and ob is not None and oa != ob and relation(oa, ob) == rel))
    out["clauses"] = clauses
    linked = {_find(scene, m) for a, _, b in parsed.clauses for m in (a, b)} - {None}
    out["relations"] = (len(clauses) == len(truth) - 1 and all(ok for _, ok in clauses)
                        and len(linked) == len(truth))
    out["all"] = bool(out["count"] and out["objects"] and out["relations"])
    return out


def score_captions(captions: Sequence[str], scenes: Sequence[Scene], vocab: dict[str, set[str]]) -> dict[str, float]:
    """Shares over scenes (count, size, colour, shape, objects, relations, all) and per relation word
    (share of stated clauses with that relation that are true)."""
    if len(captions) != len(scenes):
        raise ValueError(f"score_captions: {len(captions)} captions for {len(scenes)} scenes")
    keys = ("count", "size", "colour", "shape", "objects", "relations", "all")
    totals = dict.fromkeys(keys, 0.0)
    stated = {r: [0, 0] for r in RELATIONS}  # relation -> [true, stated]
    for caption, scene in zip(captions, scenes):
        score = score_caption(caption, scene, vocab)
        for k in keys:
            totals[k] += bool(score[k])
        for rel, ok in score["clauses"]:  # type: ignore[union-attr]
            stated[rel][0] += ok
            stated[rel][1] += 1
    n = max(len(captions), 1)
    result = {k: v / n for k, v in totals.items()}
    result.update({f"rel:{r}": (t / s if s else float("nan")) for r, (t, s) in stated.items()})
    return result


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class SceneSample:
    key: str
    image: Image.Image
    scene: Scene
    captions: list[str]


def generate_samples(config: SceneConfig, split: str) -> Iterator[SceneSample]:
    """The split's samples in order, fully determined by the seed (independent streams per split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    rng = np.random.default_rng([config.seed, 1000 + SPLITS.index(split)])
    count = config.num_train if split == "train" else config.num_test
    for i in range(count):
        held_out = split == "test" and rng.random() < config.held_out_share
        scene = sample_scene(rng, config, held_out)
        image = draw_scene(scene, config.image_size, rng)
        yield SceneSample(f"{split}_{i:06d}", image, scene, make_captions(scene, config.references_per_image, rng))


def _record(sample: SceneSample, config: SceneConfig) -> dict[str, bytes | str]:
    meta = {"scene": sample.scene.to_json(), "caption": sample.captions[0], "captions": sample.captions}
    return {"__key__": sample.key, config.image_format: encode_image(sample.image, config.image_format),
            "txt": sample.captions[0].encode(), "json": json.dumps(meta, sort_keys=True).encode()}


def _write_split(root: Path, config: SceneConfig, split: str) -> list[str]:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{split}-*.tar"):
        old.unlink()
    shards: list[str] = []
    records: list[dict] = []
    samples = list(generate_samples(config, split))
    for start in range(0, max(len(samples), 1), config.samples_per_shard):
        records = [_record(s, config) for s in samples[start:start + config.samples_per_shard]]
        path = folder / f"{split}-{len(shards):05d}.tar"
        write_tar(path, records)
        shards.append(str(path.relative_to(root)))
    return shards


@dataclass
class SceneDataset:
    """A written scenes dataset."""

    root: Path
    config: SceneConfig
    shards: dict[str, list[str]]
    seconds: float = 0.0
    reused: bool = False

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s) for s in self.shards[split]]


def write_scenes(out_dir: str | Path, config: SceneConfig = SceneConfig(), overwrite: bool = False) -> SceneDataset:
    """Write train and test shards plus dataset.json (last); reuse a complete dataset with the same config."""
    from prefixcap.runs import atomic_write_json

    root = Path(out_dir)
    info = root / DATASET_FILE
    if info.is_file() and not overwrite:
        data = json.loads(info.read_text())
        if SceneConfig.from_json(data["config"]) == config and all(
                (root / s).is_file() for split in SPLITS for s in data["shards"][split]):
            return SceneDataset(root, config, data["shards"], reused=True)
    info.unlink(missing_ok=True)
    start = time.perf_counter()
    shards = {split: _write_split(root, config, split) for split in SPLITS}
    atomic_write_json(info, {"format_version": FORMAT_VERSION, "kind": "scenes", "config": config.to_json(),
                             "shards": shards, "images": {"train": config.num_train, "test": config.num_test}})
    return SceneDataset(root, config, shards, seconds=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """python -m prefixcap.demo.scenes OUT [--num_train N] ...: write the scenes dataset, print a summary."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m prefixcap.demo.scenes", description=main.__doc__)
    parser.add_argument("out_dir")
    d = SceneConfig()
    parser.add_argument("--num_train", type=int, default=d.num_train)
    parser.add_argument("--num_test", type=int, default=d.num_test)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = SceneConfig(num_train=args.num_train, num_test=args.num_test, seed=args.seed)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    ds = write_scenes(args.out_dir, config, overwrite=args.overwrite)
    state = "reused" if ds.reused else f"written in {ds.seconds:.1f} s"
    print(f"scenes dataset {ds.root}: {config.num_train} train / {config.num_test} test images ({state})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
