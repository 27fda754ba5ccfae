"""The captioning model: CLIP encoders, mapping networks, language models and the artifact they make up."""

from prefixcap import lazy_exports

# Lazy, so that a light submodule (card, hub, push_cli) does not pull in torch.
_LAZY = {"CaptionModel": "prefixcap.model.captioning", "CaptionConfig": "prefixcap.model.config"}
__getattr__ = lazy_exports(__name__, _LAZY)
__all__ = sorted(_LAZY)
