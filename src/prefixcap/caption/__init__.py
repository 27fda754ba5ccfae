"""The caption stage: `Captioner` (a trained model) and `run_caption_job(CaptionJob)`, its library entry."""

from prefixcap import lazy_exports

# Lazy: importing one submodule (say the pipeline, for the HTTP service) must not pull in the whole stage.
_LAZY = {
    "Captioner": "prefixcap.caption.captioner",
    "CaptionJob": "prefixcap.caption.job",
    "CaptionSummary": "prefixcap.caption.job",
    "run_caption_job": "prefixcap.caption.job",
}
__getattr__ = lazy_exports(__name__, _LAZY)
__all__ = sorted(_LAZY)
