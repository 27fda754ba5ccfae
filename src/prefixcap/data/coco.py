"""COCO captions json and Karpathy dataset_*.json: one parser, so every stage keys an image the same way.

The preprocess/caption readers and the evaluation references both read these files through
`parse_coco`, so a prediction written by `prefixcap caption` always finds its references.
Keys: COCO captions json -> the image `id`; Karpathy -> `cocoid` when present (COCO results files
name images by it), else the `filename` (Flickr30k / Flickr8k files), else `imgid`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixcap.errors import UsageError


class CocoFormatError(UsageError):
    """A json that is not a COCO captions file nor a Karpathy dataset file, or a split that selects nothing."""

    def __init__(self, message: str, bad_split: bool = False):
        super().__init__(message)
        self.bad_split = bad_split  # the file is fine; the split selection is not (callers name their flag)


@dataclass
class CocoImage:
    """One image of the file with all its captions."""

    key: str
    file: str | None  # path relative to the image root ("val2014/x.jpg", or "x.jpg"); None when unnamed
    captions: list[Any]  # raw captions as written (str; tokens joined when only tokens are given)
    split: str | None = None  # Karpathy files only
    aliases: tuple[str, ...] = ()  # other names predictions may use (file name)


@dataclass
class CocoFile:
    """The images of one file (in file order) and which format it was."""

    kind: str  # "coco" | "karpathy"
    images: list[CocoImage] = field(default_factory=list)


def is_karpathy(data: Any) -> bool:
    """Karpathy files list images with their `sentences`; COCO captions files have `annotations`."""
    images = data.get("images") if isinstance(data, dict) else None
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def is_coco_captions(data: Any) -> bool:
    return isinstance(data, dict) and "annotations" in data


def karpathy_key(img: dict[str, Any]) -> str:
    """cocoid, else filename, else imgid: the one key rule for Karpathy images."""
    for name in ("cocoid", "filename", "imgid"):
        if img.get(name) is not None:
            return str(img[name])
    raise CocoFormatError(f"Karpathy image entry without cocoid, filename or imgid: {_short(img)}")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _karpathy(data: dict, path: Path | str, splits: set[str] | None) -> CocoFile:
    out = CocoFile("karpathy")
    present = {img.get("split") for img in data["images"]}
    if splits and not splits & present:
        raise CocoFormatError(f"{path}: no image in split {','.join(sorted(splits))!r}; the file has splits "
                              f"{', '.join(sorted(str(s) for s in present))}", bad_split=True)
    for img in data["images"]:
        if splits and img.get("split") not in splits:
            continue
        rel = "/".join(p for p in (img.get("filepath"), img.get("filename")) if p) or None
        captions = [s.get("raw", " ".join(s.get("tokens", []))) for s in img.get("sentences", [])
                    if isinstance(s, dict)]
        aliases = tuple(a for a in (img.get("filename"), rel) if a)
        out.images.append(CocoImage(karpathy_key(img), rel, captions, img.get("split"), aliases))
    return out


def _coco(data: dict, path: Path | str) -> CocoFile:
    out = CocoFile("coco")
    by_key: dict[str, CocoImage] = {}
    for img in data.get("images", []):
        if not isinstance(img, dict) or "id" not in img:
            raise CocoFormatError(f"{path}: image entry without 'id': {_short(img)}")
        name = img.get("file_name") or None
        entry = CocoImage(str(img["id"]), name, [], aliases=(name,) if name else ())
        by_key[entry.key] = entry
        out.images.append(entry)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise CocoFormatError(f"{path}: annotation {i} lacks image_id or caption")
        key = str(ann["image_id"])
        if key not in by_key:  # captions of an image the file does not list: keep them, with no file
            by_key[key] = CocoImage(key, None, [])
            out.images.append(by_key[key])
        by_key[key].captions.append(ann["caption"])
    return out


def parse_coco(data: Any, path: Path | str, splits: set[str] | None = None) -> CocoFile:
    """A loaded json document -> its images. `splits` selects Karpathy splits (an error on COCO files)."""
    if is_karpathy(data):
        return _karpathy(data, path, splits)
    if is_coco_captions(data):
        if splits:
            raise CocoFormatError(f"{path} is a COCO captions file (one file per split already); splits "
                                  "apply to Karpathy's dataset_*.json", bad_split=True)
        return _coco(data, path)
    if isinstance(data, dict) and "images" in data:
        raise CocoFormatError(f"{path} has 'images' but neither 'annotations' (COCO) nor 'sentences' (Karpathy)")
    raise CocoFormatError(f"{path} is not a COCO captions json nor a Karpathy dataset_*.json (no 'images' list)")


def parse_splits(value: str | None) -> set[str] | None:
    """"train,restval" -> {"train", "restval"}; None or "" -> None (every image)."""
    wanted = {s.strip() for s in (value or "").split(",") if s.strip()}
    return wanted or None


def load_coco(path: str | Path, splits: set[str] | None = None) -> CocoFile:
    """Read and parse one COCO / Karpathy json file."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:
        raise CocoFormatError(f"COCO file {path} is not valid JSON ({err})") from err
    return parse_coco(data, path, splits)
