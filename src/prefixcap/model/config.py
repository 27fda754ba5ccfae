"""CaptionConfig: the one typed config a captioner is built from, saved as its artifact's config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from prefixcap.model.adapters import LoraSettings
from prefixcap.model.mapping import MappingConfig
from prefixcap.retrieval.prompt import RetrievalSettings

ARTIFACT = "prefixcap"  # config.json's "artifact" marker


@dataclass
class CaptionConfig:
    """One typed config for the whole captioner; saved as config.json beside the weights."""

    clip_model: str = "ViT-B/32"  # encoder name as the dataset was preprocessed with
    language_model: str = "gpt2"  # hub id or local folder
    lm_family: str = "causal"  # causal | seq2seq
    tokenizer: str = ""  # what the dataset was tokenized with (defaults to language_model)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    normalize_prefix: bool = False
    # How it was trained: on CLIP image embeddings or on caption text embeddings (preprocess --text_only),
    # with CapDec's Gaussian noise of this variance on the normalised embeddings (training only).
    trained_on: str = "image"  # image | text
    noise_variance: float = 0.0
    only_prefix: bool = False  # LM frozen: its weights are not stored, only referenced
    lora: LoraSettings | None = None  # LoRA adapters on the LM (base weights frozen, not stored)
    max_token_length: int = 128  # longest caption seen in training (a generation default)
    retrieval: RetrievalSettings | None = None  # retrieval-augmented (train --datastore): k, prompt, datastore
    format_version: int = 1

    @property
    def prefix_length(self) -> int:
        return self.mapping.prefix_length

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": ARTIFACT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CaptionConfig":
        data = {k: v for k, v in data.items() if k != "artifact"}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys in prefixcap config: {sorted(unknown)}")
        mapping = MappingConfig(**data.pop("mapping", {}))
        lora = data.pop("lora", None)
        retrieval = RetrievalSettings.from_dict(data.pop("retrieval", None))
        return cls(mapping=mapping, lora=LoraSettings(**lora) if lora else None, retrieval=retrieval, **data)

    @property
    def lm_mode(self) -> str:
        """frozen | lora | fine-tuned: what training updates in the LM."""
        return "frozen" if self.only_prefix else "lora" if self.lora is not None else "fine-tuned"
