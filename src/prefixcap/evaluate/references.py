"""What evaluation compares: predictions and references, read with errors that name the file, line and key.

Predictions: caption JSONL or COCO results; references: COCO, Karpathy, JSONL or a preprocessed dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefixcap.data.images import IMAGE_EXTENSIONS
from prefixcap.errors import UsageError


class EvaluationError(UsageError):
    """Bad evaluation input; the message names the file, key or flag and what was expected."""


# Loading predictions
# ------------------------------------------------------------------------------------------
@dataclass
class Predictions:
    """Captions by image key, in file order, plus what loading them found wrong."""

    captions: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)  # key -> the caption stage's error
    duplicates: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    source: str | None = None  # --model mode: "images", "embeddings", "patch tokens" or "reader"


def _read_jsonl(path: Path, what: str) -> Iterable[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise EvaluationError(f"{what} {path}, line {lineno}: not UTF-8 text") from err
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvaluationError(f"{what} {path}, line {lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise EvaluationError(f"{what} {path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _json_document(path: Path, what: str) -> tuple[bool, Any]:
    """(True, data) for a JSON document, (False, None) for JSONL (one object per line)."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return False, None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvaluationError(f"{what} {path} is not UTF-8 text (byte {err.start}): expected JSON or JSONL") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        first = text.lstrip().split("\n", 1)[0]
        try:
            if isinstance(json.loads(first), dict):
                return False, None  # several objects, one per line
        except json.JSONDecodeError:
            pass
        raise EvaluationError(f"{what} {path} is neither JSON nor JSONL (line {err.lineno}: {err.msg})") from err
    if isinstance(data, dict) and "key" in data:  # a one-line JSONL file
        return False, None
    return True, data


def load_predictions(path: str | os.PathLike) -> Predictions:
    """JSONL lines {key, caption[, score, error]}, COCO results [{image_id, caption}] or {key: caption}."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"predictions file not found: {path}")
    out = Predictions({})

    def add(key: Any, caption: Any, where: str, error: Any = None, score: Any = None) -> None:
        if key is None:
            raise EvaluationError(f"predictions {where}: no image key (expected 'key' or 'image_id')")
        key = str(key)
        if key in out.captions:
            out.duplicates.append(key)
            return
        if isinstance(caption, list):  # num_return_sequences > 1: the first is the best
            caption = caption[0] if caption else ""
        if caption is None and error is None:
            raise EvaluationError(f"predictions {where} (image {key}): no 'caption' field")
        if caption is not None and not isinstance(caption, str):
            raise EvaluationError(f"predictions {where} (image {key}): caption must be a string, got "
                                  f"{type(caption).__name__}")
        out.captions[key] = caption or ""
        if error:
            out.errors[key] = str(error)
        if isinstance(score, (int, float)):
            out.scores[key] = float(score)

    is_json, data = _json_document(path, "predictions file")
    if not is_json:
        for lineno, obj in _read_jsonl(path, "predictions"):
            key = obj.get("key", obj.get("image_id"))
            add(key, obj.get("caption", obj.get("captions")), f"{path}, line {lineno}", obj.get("error"),
                obj.get("score"))
        return out
    if isinstance(data, list):
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise EvaluationError(f"predictions {path}, entry {i}: expected an object with image_id and caption")
            add(obj.get("image_id", obj.get("key")), obj.get("caption"), f"{path}, entry {i}", obj.get("error"),
                obj.get("score"))
    elif isinstance(data, dict) and all(isinstance(v, (str, list)) for v in data.values()):
        for key, caption in data.items():
            add(key, caption, f"{path}, key {key!r}")
    else:
        raise EvaluationError(f"predictions file {path}: expected JSONL lines {{key, caption}}, a COCO results list "
                              "[{image_id, caption}] or an object {key: caption}")
    return out


# ------------------------------------------------------------------------------------------
# Loading references
# ------------------------------------------------------------------------------------------
@dataclass
class References:
    """Reference captions by image key, where each image lives, and alternative names of each key."""

    captions: dict[str, list[str]]
    source: str  # which format was read
    image_files: dict[str, str] = field(default_factory=dict)  # key -> path relative to --images
    aliases: dict[str, str] = field(default_factory=dict)  # other name (file name, stem) -> key
    embeddings: dict[str, np.ndarray] | None = None  # preprocessed datasets: key -> (C,) CLIP embedding
    embedding_model: str | None = None  # the CLIP that produced `embeddings`
    # Preprocessed with --store_patch_tokens: key -> (N, C) tokens, read from the memory-mapped shards on use.
    patch_tokens: Mapping[str, np.ndarray] | None = None
    split: str | None = None

    def resolve(self, key: str) -> str | None:
        if key in self.captions:
            return key
        return self.aliases.get(key) or self.aliases.get(Path(key).name) or self.aliases.get(Path(key).stem)

    def add_aliases(self, key: str, *names: str | None) -> None:
        for name in names:
            if not name or name == key:
                continue
            for alias in {name, Path(name).name, Path(name).stem}:
                # An alias shared by two images (same file name in two folders) resolves to neither.
                previous = self.aliases.get(alias)
                self.aliases[alias] = key if previous in (None, key) else ""


def clean_references(captions: Iterable[Any]) -> list[str]:
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def _coco_file_references(data: dict, path: Path, split: str) -> References:
    """COCO captions json or Karpathy dataset_*.json, keyed exactly as the readers key them (data/coco.py)."""
    from prefixcap.data.coco import CocoFormatError, is_karpathy, parse_coco, parse_splits

    karpathy = is_karpathy(data)
    try:
        parsed = parse_coco(data, path, parse_splits(split) if karpathy else None)
    except CocoFormatError as err:
        raise EvaluationError(f"references {err}" + (" (choose with --split)" if err.bad_split else "")) from err
    refs = References({}, parsed.kind, split=split if karpathy else None)
    for img in parsed.images:
        refs.captions.setdefault(img.key, []).extend(clean_references(img.captions))
        if img.file:
            refs.image_files[img.key] = img.file
        refs.add_aliases(img.key, *img.aliases)
    return refs


def _jsonl_references(path: Path) -> References:
    refs = References({}, "jsonl")
    for lineno, obj in _read_jsonl(path, "references"):
        key = obj.get("key", obj.get("image_id"))
        if key is None:
            raise EvaluationError(f"references {path}, line {lineno}: no 'key'")
        caps = obj.get("captions", obj.get("caption", []))
        caps = [caps] if isinstance(caps, str) else caps
        refs.captions.setdefault(str(key), []).extend(caps)  # several lines per image are grouped
        if obj.get("image"):
            refs.image_files[str(key)] = obj["image"]
            refs.add_aliases(str(key), obj["image"])  # predictions may name the image file instead
    refs.captions = {k: clean_references(v) for k, v in refs.captions.items()}
    return refs


def _preprocessed_references(path: Path) -> References:
    from prefixcap.data.shards import load_preprocessed
    from prefixcap.data.text_only import text_only_refusal

    try:
        ds = load_preprocessed(path)
    except FileNotFoundError as err:
        raise EvaluationError(str(err)) from err
    refusal = text_only_refusal(path, ds.manifest)
    if refusal:
        raise EvaluationError(refusal)
    refs = References({}, "preprocessed", embeddings={}, embedding_model=ds.manifest.clip_model)
    by_index = ds.references()
    index_of: dict[str, int] = {}
    for index in range(ds.num_images):
        key, embedding = ds.image(index)
        refs.captions[key] = clean_references(by_index.get(index, []))
        refs.embeddings[key] = embedding  # (C,)
        index_of[key] = index
    if ds.patch_token_shape:
        refs.patch_tokens = _StoredTokens(ds, index_of)
    return refs


class _StoredTokens(Mapping):
    """key -> (N, C) patch tokens of a preprocessed dataset, read when asked for (not all held in memory)."""

    def __init__(self, ds: Any, index_of: dict[str, int]):
        self._ds, self._index_of = ds, index_of

    def __getitem__(self, key: str) -> np.ndarray:
        return self._ds.image_patch_tokens(self._index_of[key])

    def __iter__(self):
        return iter(self._index_of)

    def __len__(self) -> int:
        return len(self._index_of)


def load_references(path: str | os.PathLike, split: str = "test") -> References:
    """COCO captions json, Karpathy dataset_*.json (one --split), a preprocessed folder or JSONL {key, captions}."""
    path = Path(path)
    if path.is_dir():
        if (path / "manifest.json").exists() or (path / "shards").is_dir():
            return _preprocessed_references(path)
        raise EvaluationError(f"references folder {path} is not a preprocessed dataset (no manifest.json)")
    if not path.is_file():
        raise EvaluationError(f"references file not found: {path}")
    is_json, data = _json_document(path, "references file")
    if not is_json:
        return _jsonl_references(path)
    from prefixcap.data.coco import is_coco_captions, is_karpathy

    if is_coco_captions(data) or is_karpathy(data):
        return _coco_file_references(data, path, split)
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return References({str(k): clean_references(v) for k, v in data.items()}, "mapping")
    raise EvaluationError(f"references {path}: expected COCO captions ({{images, annotations}}), a Karpathy "
                          "dataset_*.json ({images: [{sentences, split}]}), JSONL {key, captions}, "
                          "an object {key: [captions]} or a preprocessed dataset folder")


def image_paths(refs: References, root: str | os.PathLike, keys: Iterable[str]) -> dict[str, str]:
    """key -> image file under root (from the references' file names, else root/key.*); missing ones left out."""
    root = Path(root)
    found: dict[str, str] = {}
    for key in keys:
        candidates = []
        if key in refs.image_files:
            rel = refs.image_files[key]
            candidates += [root / rel, root / Path(rel).name]
        candidates += [root / key] + [root / f"{key}{s}" for s in IMAGE_EXTENSIONS]
        for c in candidates:
            if c.is_file():
                found[key] = str(c)
                break
    return found
