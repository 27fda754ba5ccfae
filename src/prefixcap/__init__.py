"""prefixcap: teach a pretrained language model to caption images from a CLIP prefix (ClipCap)."""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names are imported lazily so `import prefixcap` stays cheap (no torch/transformers
# import until a stage is actually used).
_LAZY = {
    "load_preprocessed": "prefixcap.data.shards",
    "PreprocessedDataset": "prefixcap.data.shards",
    "CaptionModel": "prefixcap.model.captioning",
    "CaptionConfig": "prefixcap.model.captioning",
    "Captioner": "prefixcap.caption.captioner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefixcap' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
