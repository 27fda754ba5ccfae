"""The settings of one `prefixcap evaluate` run (EvaluateConfig) and what follows from them alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefixcap.data.records import ReaderOptions
from prefixcap.evaluate.scoring import ALL_METRICS
from prefixcap.generation import GenerationSettings

# The reader flags evaluate offers: --images is the image root and --split the Karpathy split.
READER_FLAGS = ("wds_image_key", "wds_caption_key", "wds_caption_in_metadata", "image_column", "caption_column",
                "key_column", "hf_split", "hf_config", "hf_streaming")


@dataclass
class EvaluateConfig:
    """Everything one `prefixcap evaluate` run needs."""

    predictions: str | None = None  # JSONL (caption stage) or COCO results json
    references: str | None = None  # COCO captions json, Karpathy json, preprocessed folder, JSONL
    model: str | None = None  # a trained prefixcap artifact: generate the captions first
    dataset: str | None = None  # the evaluation set for --model (same formats as --references)
    datastore: str | None = None  # --model's retrieval datastore (None: the one it was trained with)
    split: str = "test"  # Karpathy split(s), comma-separated; ignored by formats without splits
    images: str | None = None  # image root folder (COCO root for Karpathy) for CLIPScore / --model
    output_dir: str = "evaluation"
    name: str | None = None  # the row label in the Markdown table
    limit: int | None = None
    metrics: tuple[str, ...] = ALL_METRICS
    clip_model: str = "ViT-B/32"  # CLIPScore's CLIP; Hessel et al. used ViT-B/32
    strict: bool = False  # stop at the first bad input instead of counting it
    tokenizer: str = "auto"  # ptb | simple | auto
    spice_timeout_s: float = 3600
    device: str | None = None  # default: cuda when available (the CPU with --quantize)
    quantize: str | None = None  # --model's LM in int8 (CPU only; prefixcap.model.quantize)
    batch_size: int = 32
    # --model on any input the preprocess stage reads (its readers; same flag names). --images is
    # the image root and --split the Karpathy split, so the reader's own image_root / coco_split stay unset.
    input_format: str | None = None  # webdataset | files | parquet | csv | jsonl | coco | embeddings
    reader: ReaderOptions = field(default_factory=ReaderOptions)
    # Decoding (--model mode), passed to Captioner.caption; one caption per image is scored, so
    # num_return_sequences stays 1.
    generation: GenerationSettings = field(default_factory=GenerationSettings)


def image_root(cfg: EvaluateConfig) -> str | None:
    """--images, else (--input_format coco) the json's folder, as the readers do."""
    if cfg.images or cfg.input_format != "coco":
        return cfg.images
    return str(Path(cfg.dataset or cfg.references).parent)


def uses_reader(cfg: EvaluateConfig) -> bool:
    """Whether --model reads its --dataset with the preprocess stage's readers (not as references)."""
    # A COCO / Karpathy json is read as references (the same parser as the coco reader), which
    # also honours --split; every other --input_format goes through the readers.
    return bool(cfg.model and cfg.input_format and cfg.input_format != "coco")
