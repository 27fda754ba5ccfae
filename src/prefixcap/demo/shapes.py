"""One shape image and its words: a coloured shape drawn at a position, captions worded and parsed back.

`Attributes` (colour, shape, position, size) is what an image shows; `draw_image` draws it,
`make_captions` words it ("a red circle on the left", "at the top, there is a small blue triangle")
and `caption_attributes` parses any caption back to its (colour, shape, position) triple, so the
demo can score whether a predicted caption is right.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from prefixcap.demo.tiny_models import COLOURS, SHAPES

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


class Attributes(NamedTuple):
    """What an image shows; `triple` is what a caption must get right."""

    colour: str
    shape: str
    position: str
    size: str

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


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


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of the options, drawn with one integer from rng (the seeded streams depend on this order)."""
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
        size = pick(rng, SIZE_PHRASES[attributes.size]) + " "
    noun = f"{size}{attributes.colour} {attributes.shape}"
    place = pick(rng, PLACE_PHRASES[attributes.position])
    if rng.random() < 0.25:
        return f"{place}, there is {_with_article('a', noun)} {noun}"
    opener = pick(rng, OPENERS)
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
