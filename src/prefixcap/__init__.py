"""prefixcap: teach a pretrained language model to caption images from a CLIP prefix (ClipCap)."""

from collections.abc import Callable
from importlib import import_module
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` (PEP 562) that imports each public name's module on first use.

    Packages export their entry points this way so that `import prefixcap` or importing one light
    submodule (a model card, the serve config) stays cheap: no torch/transformers until used."""
    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


_LAZY = {
    "load_preprocessed": "prefixcap.data.shards",
    "PreprocessedDataset": "prefixcap.data.shards",
    "CaptionModel": "prefixcap.model.captioning",
    "CaptionConfig": "prefixcap.model.config",
    "Captioner": "prefixcap.caption.captioner",
}
__getattr__ = lazy_exports(__name__, _LAZY)
__all__ = sorted(_LAZY) + ["__version__"]
