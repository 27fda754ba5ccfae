"""Retrieval-augmented captioning (SmallCap-style): `build_datastore(DatastoreConfig)`, its library entry."""

from prefixcap import lazy_exports

_LAZY = {
    "DatastoreConfig": "prefixcap.retrieval.build",
    "DatastoreSummary": "prefixcap.retrieval.build",
    "build_datastore": "prefixcap.retrieval.build",
    "Datastore": "prefixcap.retrieval.datastore",
    "Retriever": "prefixcap.retrieval.datastore",
    "RetrievalSettings": "prefixcap.retrieval.prompt",
}
__getattr__ = lazy_exports(__name__, _LAZY)
__all__ = sorted(_LAZY)
