"""The train stage: fit the mapping network (and optionally the LM) on a preprocessed dataset."""

from prefixcap.train.config import TrainConfig, TrainResult
from prefixcap.train.run import train

__all__ = ["TrainConfig", "TrainResult", "train"]
