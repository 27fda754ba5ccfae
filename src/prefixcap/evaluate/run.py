"""Evaluation as a library: score captions (a predictions file, or a model's output) against references.

Two modes:
  prefixcap evaluate --predictions preds.jsonl --references captions_val2014.json [--images DIR]
  prefixcap evaluate --model PATH --dataset dataset_coco.json --split test --images COCO_ROOT
The library function `evaluate_predictions` is what both modes (and training's periodic
validation) call. Outputs: metrics.json (every figure + the settings), metrics.md, predictions.jsonl.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import prefixcap.evaluate.metrics as M
from prefixcap.data.readers import ReaderOptions
from prefixcap.generation import GenerationSettings
from prefixcap.evaluate.report import write_outputs
from prefixcap.evaluate.references import (EvaluationError, Predictions, References, clean_references, image_paths,
                                  load_predictions, load_references)

ALL_METRICS = (*M.COCO_METRICS, "clipscore")
MAX_LISTED = 20  # problem keys listed in the report per category (all are counted)
# The reader flags evaluate offers: --images is the image root and --split the Karpathy split.
READER_FLAGS = ("wds_image_key", "wds_caption_key", "wds_caption_in_metadata", "image_column", "caption_column",
                "key_column", "hf_split", "hf_config", "hf_streaming")


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
    # --model on any input the preprocess stage reads (its readers; same flag names). --images is
    # the image root and --split the Karpathy split, so the reader's own image_root / coco_split stay unset.
    input_format: str | None = None  # webdataset | files | parquet | csv | jsonl | coco | embeddings
    reader: ReaderOptions = field(default_factory=ReaderOptions)
    # Decoding (--model mode), passed to Captioner.caption; one caption per image is scored, so
    # num_return_sequences stays 1.
    generation: GenerationSettings = field(default_factory=GenerationSettings)


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
                raise EvaluationError(f"{len(keys)} {PROBLEM_MESSAGES[name]}: {_listed(keys)} "
                                      "(run without --strict to count and skip them)")
    notices = []
    unknown, no_reference, empty, errors = (problems[k] for k in PROBLEM_MESSAGES)
    if unknown:
        notices.append(f"{len(unknown)} prediction(s) name images that are not in the references and are not "
                       f"scored: {_listed(unknown)}")
    if no_reference:
        notices.append(f"{len(no_reference)} image(s) have no reference caption and are not scored: "
                       f"{_listed(no_reference)}")
    if empty:
        notices.append(f"{len(empty)} prediction(s) are empty; they are scored as empty captions (zero): "
                       f"{_listed(empty)}")
    if errors:
        notices.append(f"{len(errors)} image(s) could not be captioned and are scored as "
                       f"empty captions: {_listed(errors)}")
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
    encoder = _load_clip(clip_model, device)
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


# ------------------------------------------------------------------------------------------
# Captioning with a model (--model)
# ------------------------------------------------------------------------------------------
def _pipeline_options(cfg: EvaluateConfig) -> Any:
    from prefixcap.caption.pipeline import PipelineOptions

    return PipelineOptions(batch_size=cfg.batch_size, settings=cfg.generation)


def _record(preds: Predictions, results: Iterable[Any]) -> None:
    """Pipeline results -> predictions: the best caption per image, or "" and the image's error."""
    for r in results:
        preds.captions[r.key] = r.caption
        if r.error is not None:
            preds.errors[r.key] = r.error


def _caption_items(cfg: EvaluateConfig, cap: Any, items: Iterable[Any], total: int | None,
                   on_batch: Any = None) -> Predictions:
    """Run the captioning pipeline over items (with a progress bar); on_batch(results) sees every batch."""
    from tqdm.auto import tqdm

    from prefixcap.caption.pipeline import EmbeddingWidthError, caption_batches

    preds = Predictions({})
    try:
        with tqdm(total=total, desc="captioning", unit="img") as bar:
            for results in caption_batches(cap, items, _pipeline_options(cfg)):
                _record(preds, results)
                if on_batch is not None:
                    on_batch(results)
                bar.update(len(results))
    except EmbeddingWidthError as err:
        raise EvaluationError(f"dataset {cfg.dataset}: {err}") from err
    return preds


def _image_root(cfg: EvaluateConfig) -> str | None:
    """--images, else (--input_format coco) the json's folder, as the readers do."""
    if cfg.images or cfg.input_format != "coco":
        return cfg.images
    return str(Path(cfg.dataset or cfg.references).parent)


def _generate(cfg: EvaluateConfig, cap: Any, refs: References, keys: list[str]) -> Predictions:
    """--model mode on a references-style dataset: caption its images (or its stored CLIP embeddings)."""
    from prefixcap.caption.pipeline import Item

    if refs.embeddings is not None:
        if refs.embedding_model and _resolved(refs.embedding_model) != _resolved(cap.config.clip_model):
            raise EvaluationError(
                f"dataset {cfg.dataset} holds {refs.embedding_model!r} embeddings but model {cfg.model} "
                f"was trained on {cap.config.clip_model!r} ones")
        tokens, use_tokens = refs.patch_tokens, cap.config.mapping.takes_tokens
        if use_tokens and tokens is None:
            raise EvaluationError(
                f"model {cfg.model} ({cap.config.mapping.mapping_type} mapper) reads patch tokens, but dataset "
                f"{cfg.dataset} stores only pooled embeddings; preprocess it with --store_patch_tokens, or "
                "caption its images (--images)")
        # A token mapper reads the stored patch tokens (the pipeline picks them); others the pooled vector,
        # and no tokens are read for them.
        items = [Item(k, embedding=refs.embeddings[k], patch_tokens=tokens[k] if use_tokens else None)
                 for k in keys]
        source = "patch tokens" if use_tokens else "embeddings"
    else:
        root = _image_root(cfg)
        if not root:
            raise EvaluationError(f"--model with dataset {cfg.dataset} needs --images DIR (the folder the "
                                  "dataset's image file names are relative to)")
        paths = image_paths(refs, root, keys)
        items = [Item(k, image=paths[k]) if k in paths else Item(k, error=f"image not found under {root}")
                 for k in keys]
        source = "images"
    preds = _caption_items(cfg, cap, items, len(items))
    preds.source = source
    return preds


def _reader_options(cfg: EvaluateConfig) -> Any:
    """The dataset's reader options: --images is the image root; evaluate reads every sample (no split)."""
    from dataclasses import replace

    return replace(cfg.reader, image_root=cfg.reader.image_root or cfg.images)


def _reader_items(reader: Any, refs: References, limit: int | None) -> Iterator[Any]:
    """Items of a reader's dataset in order, one per image; every row's captions join refs as it is read."""
    from prefixcap.data.decode import decode_caption
    from prefixcap.caption.pipeline import Item

    for unit in range(len(reader.units())):
        for record in reader.records(unit):
            captions = [t for t, _ in map(decode_caption, record.captions) if t]
            if record.key in refs.captions:  # a later row of an image already read: one more reference
                refs.captions[record.key].extend(captions)
                continue
            if limit and len(refs.captions) >= limit:
                return
            refs.captions[record.key] = captions
            if record.embedding is not None:
                yield Item(record.key, embedding=record.embedding)
            elif record.image is None or record.reason:
                yield Item(record.key, error=f"no image ({record.reason or 'missing_image'})")
            else:
                yield Item(record.key, image=record.image)


def _generate_from_reader(cfg: EvaluateConfig, cap: Any, encoder: Any) -> tuple[Predictions, References]:
    """--model with --input_format: read the evaluation set with the preprocess stage's readers.

    Captions and (for CLIPScore) CLIP image embeddings are computed batch by batch while reading,
    so no image is held in memory longer than its batch.
    """
    from prefixcap.data.readers import InputError, ReaderConfig, make_reader

    try:
        reader = make_reader(ReaderConfig([cfg.dataset], cfg.input_format, _reader_options(cfg)))
    except InputError as err:
        raise EvaluationError(str(err)) from err
    refs = References({}, f"reader:{cfg.input_format}", embeddings={} if encoder is not None else None,
                      embedding_model=getattr(getattr(encoder, "spec", None), "requested", None))

    def clip_embed(results: list[Any]) -> None:  # CLIPScore's own CLIP, on the images just captioned
        ok = [r for r in results if r.error is None and r.item.image is not None]
        if encoder is not None and ok:
            feats, good = M.encode_images(encoder, [r.item.image for r in ok])  # (b, C)
            refs.embeddings.update((r.key, f) for r, f, g in zip(ok, feats.numpy(), good) if g)

    preds = _caption_items(cfg, cap, _reader_items(reader, refs, cfg.limit), cfg.limit, clip_embed)
    preds.captions = {k: preds.captions[k] for k in refs.captions}  # reader order
    preds.source = "reader"
    if refs.embeddings is not None and not refs.embeddings:
        refs.embeddings = None
    return preds, refs


# --- run(): its steps, in order -------------------------------------------------------------
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


def _uses_reader(cfg: EvaluateConfig) -> bool:
    # A COCO / Karpathy json is read as references (the same parser as the coco reader), which
    # also honours --split; every other --input_format goes through the readers.
    return bool(cfg.model and cfg.input_format and cfg.input_format != "coco")


def _clipscore_encoder(cfg: EvaluateConfig, refs: References | None) -> Any:
    """CLIPScore's CLIP, loaded before any long work so a bad --clip_model fails at once; None when unused."""
    # Stored embeddings serve CLIPScore only when they come from the CLIPScore model itself.
    embeddings_match = bool(refs is not None and refs.embeddings is not None and refs.embedding_model
                            and _resolved(refs.embedding_model) == _resolved(cfg.clip_model))
    if "clipscore" not in cfg.metrics or not (_uses_reader(cfg) or _image_root(cfg) or embeddings_match):
        return None
    if _looks_like_path(cfg.clip_model) and not os.path.exists(cfg.clip_model):
        raise EvaluationError(f"--clip_model {cfg.clip_model}: no such folder (give a local CLIP folder, an "
                              "OpenAI name such as ViT-B/32, or leave CLIPScore out with --no_clipscore)")
    try:
        return _load_clip(cfg.clip_model, cfg.device)
    except (ValueError, OSError) as err:
        raise EvaluationError(f"cannot load the CLIPScore model {cfg.clip_model!r}: {err} (give a local CLIP "
                              "folder with --clip_model, or leave CLIPScore out with --no_clipscore)") from err


def _model_predictions(cfg: EvaluateConfig, refs: References | None, encoder: Any
                       ) -> tuple[Predictions, References, dict[str, Any]]:
    """--model mode: caption the dataset; returns predictions, references and what generated them."""
    from prefixcap.caption.captioner import Captioner

    try:
        cap = Captioner.from_pretrained(cfg.model, device=cfg.device)
    except (OSError, ValueError) as err:
        raise EvaluationError(f"cannot load the model {cfg.model}: {err}") from err
    try:
        if _uses_reader(cfg):
            preds, refs = _generate_from_reader(cfg, cap, encoder)
        else:
            keys = list(refs.captions)[: cfg.limit] if cfg.limit else list(refs.captions)
            preds = _generate(cfg, cap, refs, keys)
    finally:
        cap.close()
    info = {"model": cfg.model, "caption_model_clip": cap.config.clip_model,
            "language_model": cap.config.language_model, "decoding": asdict(cfg.generation),
            "caption_input": preds.source, "input_format": cfg.input_format}
    return preds, refs, info


def _match_keys(preds: Predictions, refs: References, notices: list[str]) -> None:
    """Predictions may name images by file name where the references use ids (or the reverse)."""
    renamed = {}
    for key in list(preds.captions):
        target = refs.resolve(key)
        if target and target != key and target not in preds.captions:
            renamed[key] = target
    if renamed:
        preds.captions = {renamed.get(k, k): v for k, v in preds.captions.items()}
        preds.errors = {renamed.get(k, k): v for k, v in preds.errors.items()}
        notices.append(f"{len(renamed)} prediction key(s) matched to references by file name")


def _note_duplicates(cfg: EvaluateConfig, preds: Predictions, notices: list[str]) -> None:
    if not preds.duplicates:
        return
    if cfg.strict:
        raise EvaluationError(f"{len(preds.duplicates)} image(s) have more than one prediction: "
                              f"{_listed(preds.duplicates)} (run without --strict to score the first one)")
    notices.append(f"{len(preds.duplicates)} duplicate prediction(s) ignored (the first one per image is "
                   f"scored): {_listed(preds.duplicates)}")


def _clipscore_inputs(cfg: EvaluateConfig, preds: Predictions, refs: References, encoder: Any
                      ) -> tuple[Any, Any, str | None]:
    """(images, embeddings, why CLIPScore is skipped): stored embeddings of the same CLIP, else image files."""
    if "clipscore" not in cfg.metrics:
        return None, None, None
    if refs.embeddings is not None and encoder is not None and _same_clip(refs.embedding_model, encoder):
        return None, refs.embeddings, None
    root = _image_root(cfg)
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


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Load (or generate) predictions, score them, write the reports; returns the result."""
    _check_config(cfg)
    from prefixcap.devices import resolve_device

    cfg.device = resolve_device(cfg.device, "prefixcap evaluate")  # cuda without CUDA: cpu, with a notice
    started = time.time()
    refs = None if _uses_reader(cfg) else load_references(cfg.dataset or cfg.references, cfg.split)
    preds = load_predictions(cfg.predictions) if cfg.predictions else None
    notices: list[str] = []
    encoder = _clipscore_encoder(cfg, refs)
    generation_info: dict[str, Any] = {}
    if cfg.model:
        preds, refs, generation_info = _model_predictions(cfg, refs, encoder)
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


def _same_clip(name: str | None, encoder: Any) -> bool:
    """Whether embeddings made by CLIP `name` are the ones `encoder` makes (aliases resolved)."""
    spec = getattr(encoder, "spec", None)
    if not name or spec is None:
        return False
    return name in (spec.requested, spec.name) or _resolved(name) == spec.name


def _resolved(name: str) -> str | None:
    from prefixcap.model.encoders import resolve_encoder

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
