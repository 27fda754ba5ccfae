"""`prefixcap evaluate`: score captions (a file of predictions, or a model's output) against references.

Two modes:
  prefixcap evaluate --predictions preds.jsonl --references captions_val2014.json [--images DIR]
  prefixcap evaluate --model PATH --dataset dataset_coco.json --split test --images COCO_ROOT
The library function `evaluate_predictions` is what both modes (and training's periodic
validation) call. Outputs: metrics.json (every figure + the settings), metrics.md, predictions.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefixcap import metrics as M
from prefixcap.argtypes import boolean

ALL_METRICS = (*M.COCO_METRICS, "clipscore")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_LISTED = 20  # problem keys listed in the report per category (all are counted)


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the file, key or flag and what was expected."""


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------
@dataclass
class EvaluateConfig:
    """Everything one `prefixcap evaluate` run needs."""

    predictions: str | None = None  # JSONL (caption stage) or COCO results json
    references: str | None = None  # COCO captions json, Karpathy json, preprocessed folder, JSONL
    model: str | None = None  # a trained prefixcap artifact: generate the captions first
    dataset: str | None = None  # the evaluation set for --model (same formats as --references)
    split: str = "test"  # Karpathy split(s), comma-separated; ignored by formats without splits
    images: str | None = None  # image root folder (COCO root for Karpathy) for CLIPScore / --model
    output_dir: str = "evaluation"
    name: str | None = None  # the row label in the Markdown table
    limit: int | None = None
    metrics: tuple[str, ...] = ALL_METRICS
    clip_model: str = "ViT-B/32"  # CLIPScore's CLIP; Hessel et al. used ViT-B/32
    strict: bool = False  # stop at the first bad input instead of counting it
    tokenizer: str = "auto"  # ptb | simple | auto
    spice_timeout_s: float = 3600
    device: str | None = None  # default: cuda when available
    batch_size: int = 32
    # --model on any input the preprocess stage reads (its readers; same flag names).
    input_format: str | None = None  # webdataset | files | parquet | csv | jsonl | coco | embeddings
    wds_image_key: str = "jpg"
    wds_caption_key: str = "txt"
    wds_caption_in_metadata: bool = False
    image_column: str = "image_path"
    caption_column: str = "caption"
    key_column: str | None = None
    # Decoding (--model mode), passed to Captioner.caption.
    num_beams: int = 1
    max_new_tokens: int | None = None
    generation: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Loading predictions
# ------------------------------------------------------------------------------------------
@dataclass
class Predictions:
    """Captions by image key, in file order, plus what loading them found wrong."""

    captions: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)  # key -> the caption stage's error
    duplicates: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    source: str | None = None  # --model mode: "images", "embeddings" or "reader"


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


def _clean_refs(captions: Iterable[Any]) -> list[str]:
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def _coco_references(data: dict, path: Path) -> References:
    refs = References({}, "coco")
    for img in data.get("images", []):
        key = str(img["id"])
        refs.captions.setdefault(key, [])
        if img.get("file_name"):
            refs.image_files[key] = img["file_name"]
            refs.add_aliases(key, img["file_name"])
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise EvaluationError(f"references {path}: annotation {i} lacks image_id or caption")
        refs.captions.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    refs.captions = {k: _clean_refs(v) for k, v in refs.captions.items()}
    return refs


def _karpathy_references(data: dict, path: Path, split: str) -> References:
    wanted = {s.strip() for s in split.split(",") if s.strip()}
    present = {img.get("split") for img in data["images"]}
    if not wanted & present:
        raise EvaluationError(f"references {path}: no image in split {split!r}; the file has splits "
                              f"{', '.join(sorted(str(s) for s in present))} (choose with --split)")
    refs = References({}, "karpathy", split=split)
    for img in data["images"]:
        if img.get("split") not in wanted:
            continue
        # COCO results files name images by their COCO id, so that is the key when there is one.
        key = str(img.get("cocoid", img.get("filename", img.get("imgid"))))
        refs.captions[key] = _clean_refs(s.get("raw", " ".join(s.get("tokens", []))) for s in img.get("sentences", []))
        rel = "/".join(p for p in (img.get("filepath"), img.get("filename")) if p)
        if rel:
            refs.image_files[key] = rel
        refs.add_aliases(key, img.get("filename"), rel)
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
    refs.captions = {k: _clean_refs(v) for k, v in refs.captions.items()}
    return refs


def _manifest_encoder(manifest: Mapping[str, Any]) -> str | None:
    for name in ("clip_model", "encoder", "encoder_name", "clip"):
        value = manifest.get(name)
        if isinstance(value, str):
            return value
        if isinstance(value, Mapping):
            for sub in ("requested", "name", "clip_model"):
                if isinstance(value.get(sub), str):
                    return value[sub]
    return None


def _preprocessed_references(path: Path) -> References:
    from prefixcap.data.shards import load_preprocessed

    try:
        ds = load_preprocessed(path)
    except FileNotFoundError as err:
        raise EvaluationError(str(err)) from err
    refs = References({}, "preprocessed", embeddings={}, embedding_model=_manifest_encoder(ds.manifest))
    by_index = ds.references()
    for index in range(ds.num_images):
        key, embedding = ds.image(index)
        refs.captions[key] = _clean_refs(by_index.get(index, []))
        refs.embeddings[key] = embedding  # (C,)
    return refs


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
    if isinstance(data, dict) and "annotations" in data:
        return _coco_references(data, path)
    if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] \
            and "sentences" in data["images"][0]:
        return _karpathy_references(data, path, split)
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return References({str(k): _clean_refs(v) for k, v in data.items()}, "mapping")
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
        candidates += [root / key] + [root / f"{key}{s}" for s in IMAGE_SUFFIXES]
        for c in candidates:
            if c.is_file():
                found[key] = str(c)
                break
    return found


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------
def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _load_clip(clip_model: Any, device: str) -> Any:
    if clip_model is None or not isinstance(clip_model, str):
        return clip_model
    from prefixcap.encoders import load_encoder

    return load_encoder(clip_model, device=device)


def evaluate_predictions(
    predictions: Mapping[str, str],
    references: Mapping[str, list[str]],
    images: Mapping[str, Any] | None = None,
    image_embeddings: Mapping[str, Any] | None = None,
    clip_model: Any = None,
    metrics: Iterable[str] | None = None,
    strict: bool = False,
    tokenizer: str = "auto",
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    prediction_errors: Mapping[str, str] | None = None,
    spice_timeout_s: float = 3600,
) -> dict[str, Any]:
    """Score one caption per image against its references; the function train's validation calls.

    predictions: key -> caption; references: key -> reference captions.
    images: key -> image path or PIL image, or image_embeddings: key -> (C,) CLIP embedding of
    `clip_model` (a name/folder, or an encoder from `prefixcap.encoders.load_encoder`), for
    CLIPScore; without either, or with clip_model=None, CLIPScore is skipped.
    metrics: any of bleu, meteor, rouge, cider, spice, clipscore (default: all).
    Bad input (unknown key, image without reference, empty caption) is counted and reported under
    "problems"; with strict=True it raises EvaluationError naming the keys instead.
    Returns {"metrics", "counts", "problems", "notices", "settings", "per_image"}.
    """
    wanted = list(metrics) if metrics is not None else list(ALL_METRICS)
    unknown_metrics = [m for m in wanted if m not in ALL_METRICS]
    if unknown_metrics:
        raise EvaluationError(f"unknown metric(s) {unknown_metrics}; expected some of {', '.join(ALL_METRICS)}")
    prediction_errors = dict(prediction_errors or {})
    notices: list[str] = []
    per_image: dict[str, dict[str, Any]] = {}

    unknown = [k for k in predictions if k not in references]
    no_reference = [k for k in predictions if k in references and not _clean_refs(references[k])]
    empty = [k for k in predictions if k in references and not (predictions[k] or "").strip()
             and k not in prediction_errors]  # a failed caption is counted once, as an error
    unpredicted = [k for k in references if k not in predictions]
    problems = {"unknown_images": unknown, "no_reference": no_reference, "empty_predictions": empty,
                "caption_errors": [k for k in prediction_errors if k in predictions]}
    if strict:
        messages = {
            "unknown_images": "prediction(s) name images that are not in the references",
            "no_reference": "image(s) have no reference caption",
            "empty_predictions": "prediction(s) are empty",
            "caption_errors": "image(s) could not be captioned",
        }
        for name, keys in problems.items():
            if keys:
                raise EvaluationError(f"{len(keys)} {messages[name]}: {_listed(keys)} "
                                      "(run without --strict to count and skip them)")
    if unknown:
        notices.append(f"{len(unknown)} prediction(s) name images that are not in the references and are not "
                       f"scored: {_listed(unknown)}")
    if no_reference:
        notices.append(f"{len(no_reference)} image(s) have no reference caption and are not scored: "
                       f"{_listed(no_reference)}")
    if empty:
        notices.append(f"{len(empty)} prediction(s) are empty; they are scored as empty captions (zero): "
                       f"{_listed(empty)}")
    if problems["caption_errors"]:
        notices.append(f"{len(problems['caption_errors'])} image(s) could not be captioned and are scored as "
                       f"empty captions: {_listed(problems['caption_errors'])}")
    if unpredicted:
        notices.append(f"{len(unpredicted)} of {len(references)} reference images have no prediction "
                       "(only predicted images are scored, as the COCO evaluation does)")

    skip = set(unknown) | set(no_reference)
    keys = [k for k in predictions if k not in skip]
    preds = {k: (predictions[k] or "").strip() for k in keys}
    refs = {k: _clean_refs(references[k]) for k in keys}
    for k in predictions:
        per_image[k] = {"caption": predictions[k]}
        if k in skip:
            per_image[k]["skipped"] = "unknown image" if k in unknown else "no reference"
        else:
            per_image[k]["references"] = refs[k]
        if k in prediction_errors:
            per_image[k]["error"] = prediction_errors[k]

    figures: dict[str, float | None] = {}
    coco = [m for m in wanted if m in M.COCO_METRICS]
    tokenizer_used = None
    if coco and keys:
        scores = M.coco_scores(preds, refs, coco, tokenizer=tokenizer, spice_timeout_s=spice_timeout_s)
        tokenizer_used = scores.tokenizer
        notices += scores.notices
        figures.update(scores.corpus)
        for metric, reason in scores.skipped.items():
            for col in M.METRIC_COLUMNS[metric]:
                figures[col] = None
        for k, s in scores.per_image.items():
            per_image[k].update(s)
    elif not keys:
        notices.append("nothing to score: no prediction matches an image with references")

    clip_info: dict[str, Any] = {"used": False}
    clip_count = 0
    if "clipscore" in wanted:
        figures["CLIPScore"] = figures["RefCLIPScore"] = None
        if clip_model is None:
            notices.append("CLIPScore skipped: no CLIP model given")
        elif images is None and image_embeddings is None:
            notices.append("CLIPScore skipped: no images or image embeddings given")
        elif keys:
            encoder = _load_clip(clip_model, device)
            clip_info = {"used": True, "model": getattr(getattr(encoder, "spec", None), "requested", str(clip_model)),
                         "resolved": getattr(getattr(encoder, "spec", None), "name", None),
                         "weight": M.CLIPSCORE_WEIGHT, "prefix": M.CLIPSCORE_PREFIX,
                         "image_source": "embeddings" if image_embeddings is not None else "images"}
            if image_embeddings is not None:
                have = [k for k in keys if k in image_embeddings]
                feats = np.stack([np.asarray(image_embeddings[k], dtype=np.float32) for k in have]) if have \
                    else np.zeros((0, encoder.embedding_dim), np.float32)  # (N, C)
            else:
                listed = [k for k in keys if k in images]
                feats, ok = M.encode_images(encoder, [images[k] for k in listed], batch_size, progress)
                have = [k for k, good in zip(listed, ok) if good]
                feats = feats[ok.tolist()] if len(listed) else feats  # (N, C)
            missing = len(keys) - len(have)
            if missing:
                notices.append(f"CLIPScore: {missing} of {len(keys)} scored images have no readable image and are "
                               "left out of CLIPScore")
            if have:
                cs = M.clip_scores(encoder, feats, [preds[k] for k in have], [refs[k] for k in have],
                                   batch_size=batch_size, progress=progress)
                figures.update(cs.summary())
                for i, k in enumerate(have):
                    per_image[k]["CLIPScore"] = float(cs.clip_score[i])
                    per_image[k]["RefCLIPScore"] = float(cs.ref_clip_score[i])
            clip_count = len(have)

    diversity = M.diversity_stats([preds[k] for k in keys])
    figures.update(diversity)
    counts = {
        "predictions": len(predictions),
        "scored": len(keys),
        "reference_images": len(references),
        "references_per_scored_image": float(np.mean([len(refs[k]) for k in keys])) if keys else 0.0,
        "unknown_images": len(unknown),
        "no_reference": len(no_reference),
        "empty_predictions": len(empty),
        "caption_errors": len(problems["caption_errors"]),
        "reference_images_without_prediction": len(unpredicted),
        "clipscore_images": clip_count,
    }
    settings = {
        "metrics": wanted,
        "tokenizer": tokenizer_used,
        "java": M.java_version(),
        "clip": clip_info,
        "strict": strict,
    }
    return _json_safe({
        "metrics": figures,
        "counts": counts,
        "problems": {k: v[:MAX_LISTED] for k, v in problems.items()},
        "notices": notices,
        "settings": settings,
        "per_image": per_image,
    })


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------
# (column label, metric name, scale) in the order papers print them; scale x100 as published.
TABLE_COLUMNS = (
    ("B@1", "Bleu_1", 100), ("B@2", "Bleu_2", 100), ("B@3", "Bleu_3", 100), ("B@4", "Bleu_4", 100),
    ("METEOR", "METEOR", 100), ("ROUGE-L", "ROUGE_L", 100), ("CIDEr", "CIDEr", 100), ("SPICE", "SPICE", 100),
    ("CLIP-S", "CLIPScore", 100), ("RefCLIP-S", "RefCLIPScore", 100),
)
PAPER_COLUMNS = ("B@4", "METEOR", "CIDEr", "SPICE")
# Mokady et al. (2021), COCO Karpathy test: shown beside a run on that split for comparison.
PAPER_RESULTS = (
    ("ClipCap paper: transformer mapper, frozen GPT-2", {"B@4": 33.53, "METEOR": 27.45, "CIDEr": 113.08,
                                                         "SPICE": 21.05}),
    ("ClipCap paper: MLP mapper, fine-tuned GPT-2", {"B@4": 32.15, "METEOR": 27.1, "CIDEr": 108.35, "SPICE": 20.12}),
)


def _cell(value: Any, scale: float) -> str:
    return "–" if value is None else f"{value * scale:.2f}"


def markdown_report(result: Mapping[str, Any], name: str) -> str:
    """The paper layout (B@4, METEOR, CIDEr, SPICE), then every figure, diversity and notices."""
    figures, counts = result["metrics"], result["counts"]
    cols = [c for c in TABLE_COLUMNS if c[1] in figures]
    paper = [c for c in cols if c[0] in PAPER_COLUMNS]
    lines = [f"# Evaluation: {name}", ""]
    if paper:
        lines += ["ClipCap paper layout (x100):", "",
                  "| model | " + " | ".join(c[0] for c in paper) + " |",
                  "|---|" + "---:|" * len(paper),
                  f"| {name} | " + " | ".join(_cell(figures[c[1]], c[2]) for c in paper) + " |"]
        settings = result["settings"]
        if settings.get("reference_format") == "karpathy" and settings.get("split") == "test":
            lines += [f"| {label} | " + " | ".join(f"{row[c[0]]:.2f}" for c in paper) + " |"
                      for label, row in PAPER_RESULTS]
        lines.append("")
    if cols:
        lines += ["All metrics (x100; CLIP-S on Hessel et al.'s 0-2.5 scale, x100):", "",
                  "| model | " + " | ".join(c[0] for c in cols) + " |",
                  "|---|" + "---:|" * len(cols),
                  f"| {name} | " + " | ".join(_cell(figures[c[1]], c[2]) for c in cols) + " |", ""]
    lines += ["| images scored | mean length (words) | vocabulary | distinct captions |", "|---:|---:|---:|---:|",
              f"| {counts['scored']} | {figures['mean_length_words']:.2f} | {figures['vocabulary_size']} | "
              f"{figures['distinct_captions']} ({100 * figures['distinct_caption_share']:.1f}%) |", ""]
    clip = result["settings"].get("clip", {})
    if clip.get("used"):
        lines.append(f"CLIPScore model: {clip['model']} ({clip.get('resolved')}), images from {clip['image_source']}.")
    if result["settings"].get("tokenizer"):
        lines.append(f"Tokenizer: {result['settings']['tokenizer']}.")
    if result["notices"]:
        lines += ["", "Notices:", ""] + [f"- {n}" for n in result["notices"]]
    return "\n".join(lines) + "\n"


def write_outputs(result: Mapping[str, Any], output_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """metrics.json (figures + settings + counts), metrics.md and predictions.jsonl (per image)."""
    from prefixcap.data.shards import atomic_write_bytes, atomic_write_json

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "per_image"}
    paths = {"json": out / "metrics.json", "markdown": out / "metrics.md", "predictions": out / "predictions.jsonl"}
    atomic_write_json(paths["json"], summary)
    atomic_write_bytes(paths["markdown"], markdown_report(result, name).encode())
    lines = [json.dumps({"key": k, **v}, ensure_ascii=False) for k, v in result["per_image"].items()]
    atomic_write_bytes(paths["predictions"], ("\n".join(lines) + "\n" if lines else "").encode())
    return paths


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------
def _generate(cfg: EvaluateConfig, cap: Any, refs: References, keys: list[str], kwargs: dict[str, Any]
              ) -> Predictions:
    """--model mode on a references-style dataset: caption its images (or its stored CLIP embeddings)."""
    from tqdm.auto import tqdm

    preds = Predictions({})
    with tqdm(total=len(keys), desc="captioning", unit="img") as bar:
        if refs.embeddings is not None:
            source = "embeddings"
            if refs.embedding_model and _resolved(refs.embedding_model) != _resolved(cap.config.clip_model):
                raise EvaluationError(
                    f"dataset {cfg.dataset} holds {refs.embedding_model!r} embeddings but model {cfg.model} "
                    f"was trained on {cap.config.clip_model!r} ones")
            emb = np.stack([refs.embeddings[k] for k in keys]) if keys else np.zeros((0, 1), np.float32)  # (N, C)
            texts = cap.caption_embeddings(emb, batch_size=cfg.batch_size, progress=bar.update, **kwargs)
            preds.captions = dict(zip(keys, texts))
        else:
            source = "images"
            if not cfg.images:
                raise EvaluationError(f"--model with dataset {cfg.dataset} needs --images DIR (the folder the "
                                      "dataset's image file names are relative to)")
            paths = image_paths(refs, cfg.images, keys)
            for k in keys:
                if k not in paths:
                    preds.captions[k], preds.errors[k] = "", f"image not found under {cfg.images}"
            todo = [k for k in keys if k in paths]
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start:start + cfg.batch_size]
                _caption_batch(cap, [paths[k] for k in chunk], chunk, preds, kwargs)
                bar.update(len(chunk))
            preds.captions = {k: preds.captions[k] for k in keys}  # dataset order
    preds.source = source
    return preds


def _caption_batch(cap: Any, items: list[Any], keys: list[str], preds: Predictions, kwargs: dict[str, Any]) -> None:
    """Caption one batch; if one image is unreadable, caption the others one by one and record it."""
    try:
        preds.captions.update(zip(keys, cap.caption(items, batch_size=len(items), **kwargs)))
        return
    except ValueError:
        pass
    for key, item in zip(keys, items):
        try:
            preds.captions[key] = cap.caption([item], **kwargs)[0]
        except ValueError as err:
            preds.captions[key], preds.errors[key] = "", str(err)


def _generate_from_reader(cfg: EvaluateConfig, cap: Any, encoder: Any, kwargs: dict[str, Any]
                          ) -> tuple[Predictions, References]:
    """--model with --input_format: read the evaluation set with the preprocess stage's readers.

    Captions and (for CLIPScore) CLIP image embeddings are computed batch by batch while reading,
    so no image is held in memory longer than its batch.
    """
    from tqdm.auto import tqdm

    from prefixcap.data.decode import decode_caption
    from prefixcap.data.readers import InputError, ReaderConfig, make_reader

    try:
        reader = make_reader(ReaderConfig(
            inputs=[cfg.dataset], input_format=cfg.input_format, wds_image_key=cfg.wds_image_key,
            wds_caption_key=cfg.wds_caption_key, wds_caption_in_metadata=cfg.wds_caption_in_metadata,
            image_column=cfg.image_column, caption_column=cfg.caption_column, key_column=cfg.key_column,
            image_root=cfg.images, coco_split=cfg.split if cfg.input_format == "coco" else None))
    except InputError as err:
        raise EvaluationError(str(err)) from err
    refs = References({}, f"reader:{cfg.input_format}", embeddings={} if encoder is not None else None,
                      embedding_model=getattr(getattr(encoder, "spec", None), "requested", None))
    preds = Predictions({})
    batch: list[tuple[str, Any]] = []

    def flush() -> None:
        images = [(k, x) for k, x in batch if not isinstance(x, np.ndarray)]
        embs = [(k, x) for k, x in batch if isinstance(x, np.ndarray)]
        if images:
            _caption_batch(cap, [x for _, x in images], [k for k, _ in images], preds, kwargs)
            if encoder is not None:
                ok_items = [(k, x) for k, x in images if k not in preds.errors]
                feats, ok = M.encode_images(encoder, [x for _, x in ok_items])  # (b, C)
                for (k, _), f, good in zip(ok_items, feats.numpy(), ok):
                    if good:
                        refs.embeddings[k] = f
        if embs:
            texts = cap.caption_embeddings(np.stack([x for _, x in embs]), batch_size=len(embs), **kwargs)
            preds.captions.update(zip([k for k, _ in embs], texts))
        bar.update(len(batch))
        batch.clear()

    with tqdm(desc="captioning", unit="img", total=cfg.limit) as bar:
        for unit in range(len(reader.units())):
            for record in reader.records(unit):
                captions = [t for t, _ in map(decode_caption, record.captions) if t]
                if record.key in refs.captions:  # a later row of an image already read: one more reference
                    refs.captions[record.key].extend(captions)
                    continue
                if cfg.limit and len(refs.captions) >= cfg.limit:
                    break
                refs.captions[record.key] = captions
                if record.embedding is not None:
                    batch.append((record.key, np.asarray(record.embedding, dtype=np.float32)))
                elif record.image is None or record.reason:
                    preds.captions[record.key] = ""
                    preds.errors[record.key] = f"no image ({record.reason or 'missing_image'})"
                    bar.update(1)
                else:
                    batch.append((record.key, record.image))
                if len(batch) >= cfg.batch_size:
                    flush()
            if cfg.limit and len(refs.captions) >= cfg.limit:
                break
        if batch:
            flush()
    preds.captions = {k: preds.captions[k] for k in refs.captions}  # reader order
    if refs.embeddings is not None and not refs.embeddings:
        refs.embeddings = None
    return preds, refs


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Load (or generate) predictions, score them, write the reports; returns the result."""
    if bool(cfg.predictions) == bool(cfg.model):
        raise EvaluationError("give either --predictions FILE (score existing captions) or --model PATH "
                              "(generate them first), not both or neither")
    if cfg.predictions and not cfg.references:
        raise EvaluationError("--predictions needs --references (COCO captions json, Karpathy json with "
                              "--split, a preprocessed dataset folder or JSONL {key, captions})")
    if cfg.model and not (cfg.dataset or cfg.references):
        raise EvaluationError("--model needs --dataset (the evaluation set with its reference captions)")
    if cfg.limit is not None and cfg.limit < 1:
        raise EvaluationError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.input_format and not cfg.model:
        raise EvaluationError("--input_format reads a --dataset for --model; with --predictions give "
                              "--references instead")
    if cfg.device is None:
        import torch

        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    use_reader = bool(cfg.model and cfg.input_format)
    refs = None if use_reader else load_references(cfg.dataset or cfg.references, cfg.split)
    preds = load_predictions(cfg.predictions) if cfg.predictions else None
    kwargs = dict(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, **cfg.generation)
    if cfg.model:
        from prefixcap.caption import GenerationSettings

        try:
            GenerationSettings.split_kwargs(None, kwargs)
        except ValueError as err:
            raise EvaluationError(f"decoding flags: {err}") from err
    notices: list[str] = []

    # Load CLIPScore's CLIP before any long work, so a bad --clip_model fails at once.
    encoder = None
    # Stored embeddings serve CLIPScore only when they come from the CLIPScore model itself.
    embeddings_match = bool(refs is not None and refs.embeddings is not None and refs.embedding_model
                            and _resolved(refs.embedding_model) == _resolved(cfg.clip_model))
    want_clip = "clipscore" in cfg.metrics and bool(use_reader or cfg.images or embeddings_match)
    if want_clip:
        if _looks_like_path(cfg.clip_model) and not os.path.exists(cfg.clip_model):
            raise EvaluationError(f"--clip_model {cfg.clip_model}: no such folder (give a local CLIP folder, an "
                                  "OpenAI name such as ViT-B/32, or leave CLIPScore out with --no_clipscore)")
        try:
            encoder = _load_clip(cfg.clip_model, cfg.device)
        except (ValueError, OSError) as err:
            raise EvaluationError(f"cannot load the CLIPScore model {cfg.clip_model!r}: {err} (give a local CLIP "
                                  "folder with --clip_model, or leave CLIPScore out with --no_clipscore)") from err

    generation_info: dict[str, Any] = {}
    if cfg.model:
        from prefixcap.caption import Captioner

        try:
            cap = Captioner.from_pretrained(cfg.model, device=cfg.device)
        except (OSError, ValueError) as err:
            raise EvaluationError(f"cannot load the model {cfg.model}: {err}") from err
        if use_reader:
            preds, refs = _generate_from_reader(cfg, cap, encoder, kwargs)
            preds.source = "reader"
        else:
            keys = list(refs.captions)[: cfg.limit] if cfg.limit else list(refs.captions)
            preds = _generate(cfg, cap, refs, keys, kwargs)
        generation_info = {"model": cfg.model, "caption_model_clip": cap.config.clip_model,
                           "language_model": cap.config.language_model, "decoding": kwargs,
                           "caption_input": preds.source, "input_format": cfg.input_format}
        cap.close()
    else:
        if cfg.limit:
            preds.captions = dict(list(preds.captions.items())[: cfg.limit])
        # Predictions may name images by file name where the references use ids (or the reverse).
        renamed = {}
        for key in list(preds.captions):
            target = refs.resolve(key)
            if target and target != key and target not in preds.captions:
                renamed[key] = target
        if renamed:
            preds.captions = {renamed.get(k, k): v for k, v in preds.captions.items()}
            preds.errors = {renamed.get(k, k): v for k, v in preds.errors.items()}
            notices.append(f"{len(renamed)} prediction key(s) matched to references by file name")
    if preds.duplicates:
        if cfg.strict:
            raise EvaluationError(f"{len(preds.duplicates)} image(s) have more than one prediction: "
                                  f"{_listed(preds.duplicates)} (run without --strict to score the first one)")
        notices.append(f"{len(preds.duplicates)} duplicate prediction(s) ignored (the first one per image is "
                       f"scored): {_listed(preds.duplicates)}")

    images = embeddings = None
    metrics = list(cfg.metrics)
    clip_skipped = None
    if "clipscore" in metrics:
        if refs.embeddings is not None and encoder is not None and _same_clip(refs.embedding_model, encoder):
            embeddings = refs.embeddings
        elif cfg.images:
            images = image_paths(refs, cfg.images, [k for k in preds.captions if k in refs.captions])
        elif refs.embeddings is not None:
            clip_skipped = (f"CLIPScore skipped: the dataset's embeddings come from {refs.embedding_model!r}, not "
                            f"{cfg.clip_model!r}; give --images DIR, or --clip_model {refs.embedding_model}")
        else:
            clip_skipped = ("CLIPScore skipped: no images; give --images DIR (the folder the references' image "
                            "file names are relative to) or a preprocessed dataset as references")
        if clip_skipped:
            metrics.remove("clipscore")
    result = evaluate_predictions(
        preds.captions, refs.captions, images=images, image_embeddings=embeddings, clip_model=encoder,
        metrics=metrics, strict=cfg.strict, tokenizer=cfg.tokenizer, device=cfg.device,
        batch_size=cfg.batch_size, prediction_errors=preds.errors, spice_timeout_s=cfg.spice_timeout_s)
    if clip_skipped:
        result["metrics"]["CLIPScore"] = result["metrics"]["RefCLIPScore"] = None
        notices.append(clip_skipped)
    if preds.source == "reader" and result["settings"]["clip"].get("used"):
        result["settings"]["clip"]["image_source"] = f"images read with --input_format {cfg.input_format}"
    result["notices"] = notices + result["notices"]
    result["counts"]["duplicate_predictions"] = len(preds.duplicates)
    name = cfg.name or Path(cfg.model or cfg.predictions).name
    result["settings"].update({
        "name": name,
        "predictions": cfg.predictions,
        "references": cfg.references,
        "dataset": cfg.dataset,
        "reference_format": refs.source,
        "split": refs.split,
        "images": cfg.images,
        "limit": cfg.limit,
        **generation_info,
        "prefixcap_version": _version(),
        "pycocoevalcap_version": _dist_version("pycocoevalcap"),
        "seconds": round(time.time() - started, 2),
    })
    paths = write_outputs(result, cfg.output_dir, name)
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    return result


def _looks_like_path(name: str) -> bool:
    # Hub ids are "org/name"; anything absolute, relative-dotted or deeper is meant as a folder.
    return os.path.isabs(name) or name.startswith(".") or name.count("/") > 1


def _same_clip(name: str | None, encoder: Any) -> bool:
    """Whether embeddings made by CLIP `name` are the ones `encoder` makes (aliases resolved)."""
    spec = getattr(encoder, "spec", None)
    if not name or spec is None:
        return False
    return name in (spec.requested, spec.name) or _resolved(name) == spec.name


def _resolved(name: str) -> str | None:
    from prefixcap.encoders import resolve_encoder

    try:
        return resolve_encoder(name).name
    except ValueError:
        return None


def _version() -> str:
    from prefixcap import __version__

    return __version__


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# Decoding flags passed through to Captioner (GenerationSettings) only when given.
GENERATION_FLAGS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty")



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefixcap evaluate",
        description="COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE), CLIPScore/RefCLIPScore and "
                    "diversity, for a predictions file or a model's captions.")
    src = p.add_argument_group("what to score")
    src.add_argument("--predictions", help="JSONL from `prefixcap caption` ({key, caption}) or COCO results json "
                                           "[{image_id, caption}]")
    src.add_argument("--references", help="COCO captions json, Karpathy dataset_*.json, preprocessed dataset "
                                          "folder, or JSONL {key, captions}")
    src.add_argument("--model", help="a trained prefixcap model folder: caption --dataset first, then score")
    src.add_argument("--dataset", help="evaluation set for --model (same formats as --references)")
    src.add_argument("--split", default="test", help="Karpathy split(s), comma-separated (default: test)")
    src.add_argument("--images", help="image folder (the COCO root for Karpathy files): CLIPScore, and --model "
                                      "on a json dataset")
    src.add_argument("--limit", type=int, help="evaluate only the first N images")
    r = p.add_argument_group("--model on any input the preprocess stage reads (same flags as preprocess)")
    r.add_argument("--input_format", help="read --dataset with the preprocess readers: webdataset, files, parquet, "
                                          "csv, jsonl, coco or embeddings (several captions per image are grouped)")
    r.add_argument("--wds_image_key", default="jpg")
    r.add_argument("--wds_caption_key", default="txt")
    r.add_argument("--wds_caption_in_metadata", type=boolean, nargs="?", const=True, default=False,
                   help="captions are a field (--wds_caption_key) of each sample's json")
    r.add_argument("--image_column", default="image_path")
    r.add_argument("--caption_column", default="caption")
    r.add_argument("--key_column", default=None)
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)")
    m.add_argument("--no_clipscore", action="store_true", help="leave CLIPScore/RefCLIPScore out")
    m.add_argument("--no_spice", action="store_true", help="leave SPICE out (it is slow)")
    m.add_argument("--clip_model", default="ViT-B/32",
                   help="CLIP for CLIPScore: OpenAI name, HF id or local folder (default ViT-B/32, as Hessel et al.)")
    m.add_argument("--tokenizer", choices=("auto", "ptb", "simple"), default="auto",
                   help="ptb = pycocoevalcap's Stanford PTBTokenizer (needs Java; comparable with published "
                        "numbers); simple = Java-free approximation (default: ptb when Java is present)")
    m.add_argument("--spice_timeout_s", type=float, default=3600)
    m.add_argument("--strict", action="store_true", help="stop at the first bad input instead of counting it")
    g = p.add_argument_group("decoding (--model)")
    g.add_argument("--num_beams", type=int, default=1)
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: the longest caption the model saw in training")
    g.add_argument("--do_sample", action="store_true")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top_k", type=int, default=None)
    g.add_argument("--top_p", type=float, default=None)
    g.add_argument("--repetition_penalty", type=float, default=None)
    g.add_argument("--length_penalty", type=float, default=None)
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    o = p.add_argument_group("output")
    o.add_argument("--output_dir", default="evaluation", help="where metrics.json, metrics.md and "
                                                               "predictions.jsonl go (default: ./evaluation)")
    o.add_argument("--name", help="row label in the Markdown table (default: the model / predictions file name)")
    return p


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    wanted = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = [m for m in wanted if m not in ALL_METRICS]
    if unknown:
        raise EvaluationError(f"--metrics: unknown metric(s) {unknown}; expected some of {', '.join(ALL_METRICS)}")
    wanted = tuple(m for m in wanted if not (args.no_clipscore and m == "clipscore")
                   and not (args.no_spice and m == "spice"))
    return EvaluateConfig(
        predictions=args.predictions, references=args.references, model=args.model, dataset=args.dataset,
        split=args.split, images=args.images, output_dir=args.output_dir, name=args.name, limit=args.limit,
        metrics=wanted, clip_model=args.clip_model, strict=args.strict, tokenizer=args.tokenizer,
        spice_timeout_s=args.spice_timeout_s, device=args.device, batch_size=args.batch_size,
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, input_format=args.input_format,
        wds_image_key=args.wds_image_key, wds_caption_key=args.wds_caption_key,
        wds_caption_in_metadata=args.wds_caption_in_metadata, image_column=args.image_column,
        caption_column=args.caption_column, key_column=args.key_column,
        generation={k: getattr(args, k) for k in GENERATION_FLAGS if getattr(args, k) not in (None, False)},
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = run(cfg)
    except (EvaluationError, M.MetricError, OSError) as err:  # OSError names the file it could not read
        print(f"prefixcap evaluate: error: {err}", file=sys.stderr)
        return 2
    print(markdown_report(result, result["settings"]["name"]))
    print(f"wrote {', '.join(result['outputs'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
