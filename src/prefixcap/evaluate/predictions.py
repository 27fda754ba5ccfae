"""Captioning with a model (`prefixcap evaluate --model`): the evaluation set's images -> predictions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

import prefixcap.evaluate.metrics as M
from prefixcap.evaluate.config import EvaluateConfig, image_root, uses_reader
from prefixcap.evaluate.references import EvaluationError, Predictions, References, image_paths
from prefixcap.evaluate.scoring import resolved_clip
from prefixcap.retrieval.datastore import DatastoreError


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


def _generate(cfg: EvaluateConfig, cap: Any, refs: References, keys: list[str]) -> Predictions:
    """--model mode on a references-style dataset: caption its images (or its stored CLIP embeddings)."""
    from prefixcap.caption.pipeline import Item

    if refs.embeddings is not None:
        if refs.embedding_model and resolved_clip(refs.embedding_model) != resolved_clip(cap.config.clip_model):
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
        root = image_root(cfg)
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
    from prefixcap.data.readers import make_reader
    from prefixcap.data.records import InputError, ReaderConfig

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


def model_predictions(cfg: EvaluateConfig, refs: References | None, encoder: Any
                      ) -> tuple[Predictions, References, dict[str, Any]]:
    """--model mode: caption the dataset; returns predictions, references and what generated them."""
    from prefixcap.caption.captioner import Captioner

    try:
        device = cfg.device or ("cpu" if cfg.quantize else None)  # --quantize is a CPU feature
        cap = Captioner.from_pretrained(cfg.model, device=device, datastore=cfg.datastore, quantize=cfg.quantize)
    except DatastoreError:  # a missing, empty or other-width --datastore: its own line, exit 2
        raise
    except (OSError, ValueError) as err:
        raise EvaluationError(f"cannot load the model {cfg.model}: {err}") from err
    try:
        if uses_reader(cfg):
            preds, refs = _generate_from_reader(cfg, cap, encoder)
        else:
            keys = list(refs.captions)[: cfg.limit] if cfg.limit else list(refs.captions)
            preds = _generate(cfg, cap, refs, keys)
    finally:
        cap.close()
    info = {"model": cfg.model, "caption_model_clip": cap.config.clip_model,
            **({"datastore": str(cap.retriever.datastore.path)} if cap.retriever is not None else {}),
            "language_model": cap.config.language_model, "decoding": asdict(cfg.generation), "quantize": cfg.quantize,
            "caption_input": preds.source, "input_format": cfg.input_format}
    return preds, refs, info
