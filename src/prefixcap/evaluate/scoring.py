"""Scoring: one caption per image against its references (COCO metrics, CLIPScore), bad input counted."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

import prefixcap.evaluate.metrics as M
from prefixcap.evaluate.references import EvaluationError, clean_references

ALL_METRICS = (*M.COCO_METRICS, "clipscore")
MAX_LISTED = 20  # problem keys listed in the report per category (all are counted)


def listed_keys(keys: list[str]) -> str:
    """The first five keys, and how many more: one line of a notice or an error."""
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


def load_clip(clip_model: Any, device: str) -> Any:
    """CLIPScore's CLIP: a name or folder is loaded, an encoder (or None) passes through."""
    if clip_model is None or not isinstance(clip_model, str):
        return clip_model
    from prefixcap.model.encoders import load_encoder

    return load_encoder(clip_model, device=device)


PROBLEM_MESSAGES = {
    "unknown_images": "prediction(s) name images that are not in the references",
    "no_reference": "image(s) have no reference caption",
    "empty_predictions": "prediction(s) are empty",
    "caption_errors": "image(s) could not be captioned",
}


def _find_problems(predictions: Mapping[str, str], references: Mapping[str, list[str]],
                   prediction_errors: Mapping[str, str]) -> dict[str, list[str]]:
    """Keys of each kind of bad input (all counted; unknown and unreferenced images are not scored)."""
    return {
        "unknown_images": [k for k in predictions if k not in references],
        "no_reference": [k for k in predictions if k in references and not clean_references(references[k])],
        # a failed caption is counted once, as an error
        "empty_predictions": [k for k in predictions if k in references and not (predictions[k] or "").strip()
                              and k not in prediction_errors],
        "caption_errors": [k for k in prediction_errors if k in predictions],
    }


def _problem_notices(problems: dict[str, list[str]], unpredicted: list[str], num_references: int,
                     strict: bool) -> list[str]:
    if strict:
        for name, keys in problems.items():
            if keys:
                raise EvaluationError(f"{len(keys)} {PROBLEM_MESSAGES[name]}: {listed_keys(keys)} "
                                      "(run without --strict to count and skip them)")
    notices = []
    unknown, no_reference, empty, errors = (problems[k] for k in PROBLEM_MESSAGES)
    if unknown:
        notices.append(f"{len(unknown)} prediction(s) name images that are not in the references and are not "
                       f"scored: {listed_keys(unknown)}")
    if no_reference:
        notices.append(f"{len(no_reference)} image(s) have no reference caption and are not scored: "
                       f"{listed_keys(no_reference)}")
    if empty:
        notices.append(f"{len(empty)} prediction(s) are empty; they are scored as empty captions (zero): "
                       f"{listed_keys(empty)}")
    if errors:
        notices.append(f"{len(errors)} image(s) could not be captioned and are scored as "
                       f"empty captions: {listed_keys(errors)}")
    if unpredicted:
        notices.append(f"{len(unpredicted)} of {num_references} reference images have no prediction "
                       "(only predicted images are scored, as the COCO evaluation does)")
    return notices


def _per_image_rows(predictions: Mapping[str, str], refs: dict[str, list[str]], problems: dict[str, list[str]],
                    prediction_errors: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    per_image: dict[str, dict[str, Any]] = {}
    unknown = set(problems["unknown_images"])
    for k in predictions:
        per_image[k] = {"caption": predictions[k]}
        if k in refs:
            per_image[k]["references"] = refs[k]
        else:
            per_image[k]["skipped"] = "unknown image" if k in unknown else "no reference"
        if k in prediction_errors:
            per_image[k]["error"] = prediction_errors[k]
    return per_image


def _coco_figures(wanted: list[str], preds: dict[str, str], refs: dict[str, list[str]], tokenizer: str,
                  spice_timeout_s: float, figures: dict, per_image: dict, notices: list[str]) -> str | None:
    """BLEU/METEOR/ROUGE/CIDEr/SPICE into figures and per_image; returns the tokenizer used."""
    coco = [m for m in wanted if m in M.COCO_METRICS]
    if not preds:
        notices.append("nothing to score: no prediction matches an image with references")
        return None
    if not coco:
        return None
    scores = M.coco_scores(preds, refs, coco, tokenizer=tokenizer, spice_timeout_s=spice_timeout_s)
    notices += scores.notices
    figures.update(scores.corpus)
    for metric in scores.skipped:
        for col in M.METRIC_COLUMNS[metric]:
            figures[col] = None
    for k, s in scores.per_image.items():
        per_image[k].update(s)
    return scores.tokenizer


def _clip_features(encoder: Any, keys: list[str], images: Mapping[str, Any] | None,
                   image_embeddings: Mapping[str, Any] | None, batch_size: int, progress: bool
                   ) -> tuple[list[str], Any]:
    """(keys with a usable image, their (N, C) CLIP image features): stored embeddings, else encoded images."""
    if image_embeddings is not None:
        have = [k for k in keys if k in image_embeddings]
        feats = np.stack([np.asarray(image_embeddings[k], dtype=np.float32) for k in have]) if have \
            else np.zeros((0, encoder.embedding_dim), np.float32)  # (N, C)
        return have, feats
    listed = [k for k in keys if k in images]
    feats, ok = M.encode_images(encoder, [images[k] for k in listed], batch_size, progress)
    have = [k for k, good in zip(listed, ok) if good]
    return have, (feats[ok.tolist()] if len(listed) else feats)  # (N, C)


def _clipscore_figures(clip_model: Any, images: Mapping[str, Any] | None, image_embeddings: Mapping[str, Any] | None,
                       preds: dict[str, str], refs: dict[str, list[str]], device: str, batch_size: int,
                       progress: bool, figures: dict, per_image: dict, notices: list[str]
                       ) -> tuple[dict[str, Any], int]:
    """CLIPScore/RefCLIPScore into figures and per_image; returns (settings of the CLIP used, images scored)."""
    figures["CLIPScore"] = figures["RefCLIPScore"] = None
    keys = list(preds)
    if clip_model is None:
        notices.append("CLIPScore skipped: no CLIP model given")
        return {"used": False}, 0
    if images is None and image_embeddings is None:
        notices.append("CLIPScore skipped: no images or image embeddings given")
        return {"used": False}, 0
    if not keys:
        return {"used": False}, 0
    encoder = load_clip(clip_model, device)
    spec = getattr(encoder, "spec", None)
    clip_info = {"used": True, "model": getattr(spec, "requested", str(clip_model)),
                 "resolved": getattr(spec, "name", None), "weight": M.CLIPSCORE_WEIGHT, "prefix": M.CLIPSCORE_PREFIX,
                 "image_source": "embeddings" if image_embeddings is not None else "images"}
    have, feats = _clip_features(encoder, keys, images, image_embeddings, batch_size, progress)
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
    return clip_info, len(have)


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
    `clip_model` (a name/folder, or an encoder from `prefixcap.model.encoders.load_encoder`), for
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
    problems = _find_problems(predictions, references, prediction_errors)
    unpredicted = [k for k in references if k not in predictions]
    notices = _problem_notices(problems, unpredicted, len(references), strict)

    skip = set(problems["unknown_images"]) | set(problems["no_reference"])
    keys = [k for k in predictions if k not in skip]
    preds = {k: (predictions[k] or "").strip() for k in keys}
    refs = {k: clean_references(references[k]) for k in keys}
    per_image = _per_image_rows(predictions, refs, problems, prediction_errors)
    figures: dict[str, float | None] = {}
    tokenizer_used = _coco_figures(wanted, preds, refs, tokenizer, spice_timeout_s, figures, per_image, notices)
    clip_info, clip_count = {"used": False}, 0
    if "clipscore" in wanted:
        clip_info, clip_count = _clipscore_figures(clip_model, images, image_embeddings, preds, refs, device,
                                                   batch_size, progress, figures, per_image, notices)
    figures.update(M.diversity_stats([preds[k] for k in keys]))
    counts = {
        "predictions": len(predictions),
        "scored": len(keys),
        "reference_images": len(references),
        "references_per_scored_image": float(np.mean([len(refs[k]) for k in keys])) if keys else 0.0,
        **{name: len(problems[name]) for name in PROBLEM_MESSAGES},
        "reference_images_without_prediction": len(unpredicted),
        "clipscore_images": clip_count,
    }
    settings = {"metrics": wanted, "tokenizer": tokenizer_used, "java": M.java_version(), "clip": clip_info,
                "strict": strict}
    return _json_safe({
        "metrics": figures,
        "counts": counts,
        "problems": {k: v[:MAX_LISTED] for k, v in problems.items()},
        "notices": notices,
        "settings": settings,
        "per_image": per_image,
    })



def same_clip(name: str | None, encoder: Any) -> bool:
    """Whether embeddings made by CLIP `name` are the ones `encoder` makes (aliases resolved)."""
    spec = getattr(encoder, "spec", None)
    if not name or spec is None:
        return False
    return name in (spec.requested, spec.name) or resolved_clip(name) == spec.name


def resolved_clip(name: str) -> str | None:
    """The CLIP a name or alias stands for; None when it names none."""
    from prefixcap.model.encoders import resolve_encoder

    try:
        return resolve_encoder(name).name
    except ValueError:
        return None
