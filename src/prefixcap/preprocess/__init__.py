"""The preprocess stage: encode images with CLIP and tokenize captions into resumable Arrow shards + a manifest."""

from prefixcap.preprocess.progress import PreprocessSummary
from prefixcap.preprocess.run import PreprocessConfig, run_preprocess

__all__ = ["PreprocessConfig", "PreprocessSummary", "run_preprocess"]
