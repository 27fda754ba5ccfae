"""Evaluation as a library: `evaluate(EvaluateConfig)` scores captions (a file, or a model's) against references.

Two modes:
  prefixcap evaluate --predictions preds.jsonl --references captions_val2014.json [--images DIR]
  prefixcap evaluate --model PATH --dataset dataset_coco.json --split test --images COCO_ROOT
Both modes end in `prefixcap.evaluate.scoring.evaluate_predictions` (which training's periodic
validation calls too); --model captions first (`prefixcap.evaluate.predictions`).
Outputs: metrics.json (every figure + the settings), metrics.md, predictions.jsonl.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefixcap.evaluate.config import EvaluateConfig, image_root, uses_reader
from prefixcap.evaluate.predictions import model_predictions
from prefixcap.evaluate.references import (EvaluationError, Predictions, References, image_paths,
                                           load_predictions, load_references)
from prefixcap.evaluate.report import write_outputs
from prefixcap.evaluate.scoring import evaluate_predictions, listed_keys, load_clip, resolved_clip, same_clip


# --- evaluate(): its steps, in order -------------------------------------------------------------
def _check_config(cfg: EvaluateConfig) -> None:
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
    if cfg.model:
        try:
            cfg.generation.validate()
        except ValueError as err:
            raise EvaluationError(f"decoding flags: {err}") from err
        if cfg.generation.num_return_sequences != 1:
            raise EvaluationError(f"decoding: num_return_sequences={cfg.generation.num_return_sequences}, but "
                                  "evaluate scores one caption per image (use 1)")


def _clipscore_encoder(cfg: EvaluateConfig, refs: References | None) -> Any:
    """CLIPScore's CLIP, loaded before any long work so a bad --clip_model fails at once; None when unused."""
    # Stored embeddings serve CLIPScore only when they come from the CLIPScore model itself.
    embeddings_match = bool(refs is not None and refs.embeddings is not None and refs.embedding_model
                            and resolved_clip(refs.embedding_model) == resolved_clip(cfg.clip_model))
    if "clipscore" not in cfg.metrics or not (uses_reader(cfg) or image_root(cfg) or embeddings_match):
        return None
    if _looks_like_path(cfg.clip_model) and not os.path.exists(cfg.clip_model):
        raise EvaluationError(f"--clip_model {cfg.clip_model}: no such folder (give a local CLIP folder, an "
                              "OpenAI name such as ViT-B/32, or leave CLIPScore out with --no_clipscore)")
    try:
        return load_clip(cfg.clip_model, cfg.device)
    except (ValueError, OSError) as err:
        raise EvaluationError(f"cannot load the CLIPScore model {cfg.clip_model!r}: {err} (give a local CLIP "
                              "folder with --clip_model, or leave CLIPScore out with --no_clipscore)") from err


def _match_keys(preds: Predictions, refs: References, notices: list[str]) -> None:
    """Predictions may name images by file name where the references use ids (or the reverse)."""
    renamed, ambiguous = {}, []
    for key in list(preds.captions):
        target = refs.resolve(key)
        if target and target != key and target not in preds.captions:
            renamed[key] = target
        elif target == "":  # the same file name in two folders: scoring it against either would be a guess
            ambiguous.append(key)
    if ambiguous:
        notices.append(f"{len(ambiguous)} prediction key(s) name more than one reference image (the same file "
                       f"name in two folders) and are not scored: {listed_keys(ambiguous)}; key them by the "
                       "references' keys or image paths")
    if renamed:
        preds.captions = {renamed.get(k, k): v for k, v in preds.captions.items()}
        preds.errors = {renamed.get(k, k): v for k, v in preds.errors.items()}
        notices.append(f"{len(renamed)} prediction key(s) matched to references by file name")


def _note_duplicates(cfg: EvaluateConfig, preds: Predictions, notices: list[str]) -> None:
    if not preds.duplicates:
        return
    if cfg.strict:
        raise EvaluationError(f"{len(preds.duplicates)} image(s) have more than one prediction: "
                              f"{listed_keys(preds.duplicates)} (run without --strict to score the first one)")
    notices.append(f"{len(preds.duplicates)} duplicate prediction(s) ignored (the first one per image is "
                   f"scored): {listed_keys(preds.duplicates)}")


def _clipscore_inputs(cfg: EvaluateConfig, preds: Predictions, refs: References, encoder: Any
                      ) -> tuple[Any, Any, str | None]:
    """(images, embeddings, why CLIPScore is skipped): stored embeddings of the same CLIP, else image files."""
    if "clipscore" not in cfg.metrics:
        return None, None, None
    if refs.embeddings is not None and encoder is not None and same_clip(refs.embedding_model, encoder):
        return None, refs.embeddings, None
    root = image_root(cfg)
    if root:
        return image_paths(refs, root, [k for k in preds.captions if k in refs.captions]), None, None
    if refs.embeddings is not None:
        return None, None, (f"CLIPScore skipped: the dataset's embeddings come from {refs.embedding_model!r}, not "
                            f"{cfg.clip_model!r}; give --images DIR, or --clip_model {refs.embedding_model}")
    return None, None, ("CLIPScore skipped: no images; give --images DIR (the folder the references' image "
                        "file names are relative to) or a preprocessed dataset as references")


def _score(cfg: EvaluateConfig, preds: Predictions, refs: References, encoder: Any, notices: list[str]
           ) -> dict[str, Any]:
    images, embeddings, clip_skipped = _clipscore_inputs(cfg, preds, refs, encoder)
    metrics = [m for m in cfg.metrics if not (clip_skipped and m == "clipscore")]
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
    return result


def _run_settings(cfg: EvaluateConfig, refs: References, generation_info: dict[str, Any], started: float
                  ) -> dict[str, Any]:
    return {
        "name": cfg.name or Path(cfg.model or cfg.predictions).name,
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
    }


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Load (or generate) predictions, score them, write the reports; returns the result."""
    _check_config(cfg)
    from prefixcap.devices import resolve_device

    cfg.device = resolve_device(cfg.device, "prefixcap evaluate")  # cuda without CUDA: cpu, with a notice
    started = time.time()
    refs = None if uses_reader(cfg) else load_references(cfg.dataset or cfg.references, cfg.split)
    preds = load_predictions(cfg.predictions) if cfg.predictions else None
    notices: list[str] = []
    encoder = _clipscore_encoder(cfg, refs)
    generation_info: dict[str, Any] = {}
    if cfg.model:
        preds, refs, generation_info = model_predictions(cfg, refs, encoder)
    else:
        if cfg.limit:
            preds.captions = dict(list(preds.captions.items())[: cfg.limit])
        _match_keys(preds, refs, notices)
    _note_duplicates(cfg, preds, notices)
    result = _score(cfg, preds, refs, encoder, notices)
    result["settings"].update(_run_settings(cfg, refs, generation_info, started))
    paths = write_outputs(result, cfg.output_dir, result["settings"]["name"])
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    return result


def _looks_like_path(name: str) -> bool:
    # Hub ids are "org/name"; anything absolute, relative-dotted or deeper is meant as a folder.
    return os.path.isabs(name) or name.startswith(".") or name.count("/") > 1


def _version() -> str:
    from prefixcap import __version__

    return __version__


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
