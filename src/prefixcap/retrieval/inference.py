"""Retrieval at inference: the Retriever a loaded model captions with (its own datastore, or one given)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from prefixcap.retrieval.datastore import DatastoreError, Retriever, open_datastore


def retriever_for(model: Any, datastore: str | None = None, flag: str = "--datastore") -> Retriever | None:
    """The Retriever of a CaptionModel: None for a model trained without retrieval (refused if `datastore`
    is given), else the given datastore or the one recorded in the model's config."""
    settings = model.config.retrieval
    if settings is None:
        if datastore:
            raise DatastoreError(f"{flag} {datastore}: this model was trained without retrieval (no 'retrieval' in its "
                             "config.json), so it cannot use a datastore; train one with prefixcap train --datastore")
        return None
    path = datastore or settings.datastore
    if not path:
        raise DatastoreError(f"this retrieval-augmented model records no datastore; pass {flag}")
    if not datastore and not Path(path).is_dir():
        raise DatastoreError(f"this model retrieves from its training datastore {path}, which does not exist here; "
                         f"pass {flag} with a datastore built with its CLIP model ({model.config.clip_model})")
    store = open_datastore(path, model.config.clip_model, model.config.mapping.prefix_size,
                           what="the model's CLIP model")
    return Retriever(store, replace(settings, datastore=str(store.path)), model.tokenizer)
