"""The evaluate stage: COCO metrics and CLIPScore for a predictions file or a model's own captions."""

from prefixcap.evaluate.config import EvaluateConfig
from prefixcap.evaluate.run import evaluate
from prefixcap.evaluate.scoring import evaluate_predictions

__all__ = ["EvaluateConfig", "evaluate", "evaluate_predictions"]
