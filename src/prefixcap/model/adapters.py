"""LoRA adapters on the language model (through PEFT): settings, target modules per LM type, attach/merge.

The LM keeps its own class: PEFT injects the LoRA layers in place, so `CaptionModel.lm` is still the
transformers model (the fast loss path, `generate` and the serving code are unchanged) and the
`PeftModel` wrapper is kept beside it only to save, load and merge the adapter.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from torch import nn

ADAPTER_DIR = "lm_adapter"  # PEFT's own layout: adapter_config.json + adapter_model.safetensors

# LM model_type -> the modules LoRA adapts by default (attention projections, as the LoRA paper and
# PEFT's examples do). GPT-2's c_proj covers both the attention output and the MLP output projection.
# Any model_type not listed falls back to PEFT's own table; --lora_target_modules overrides both.
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "gpt_bigcode": ["c_attn", "c_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


class AdapterError(ValueError):
    """A LoRA setting that cannot be applied to this LM (the message names the flag)."""


@dataclass
class LoraSettings:
    """How the LM is adapted; saved in config.json so `from_pretrained` rebuilds the same layers."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)  # resolved names (never empty once attached)


def default_targets(lm: nn.Module) -> list[str]:
    """The LoRA target modules for this LM's model_type (ours, else PEFT's table)."""
    model_type = getattr(lm.config, "model_type", "")
    if model_type in LORA_TARGETS:
        return list(LORA_TARGETS[model_type])
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table
    except ImportError:
        peft_table = {}
    targets = peft_table.get(model_type)
    if isinstance(targets, list) and targets:
        return list(targets)
    raise AdapterError(f"no default LoRA target modules for LM type {model_type!r}; name them with "
                       "--lora_target_modules (e.g. q_proj,v_proj)")


def resolve_settings(lm: nn.Module, rank: int, alpha: float, dropout: float,
                     target_modules: list[str] | None = None) -> LoraSettings:
    """Check the flags against the LM and fill in the target modules."""
    if rank < 1:
        raise AdapterError(f"--lora_rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise AdapterError(f"--lora_alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise AdapterError(f"--lora_dropout must be in [0, 1), got {dropout}")
    targets = list(target_modules) if target_modules else default_targets(lm)
    names = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise AdapterError(f"--lora_target_modules: the LM ({getattr(lm.config, 'model_type', '?')}) has no module "
                           f"named {', '.join(missing)}")
    return LoraSettings(rank=rank, alpha=float(alpha), dropout=float(dropout), target_modules=targets)


def _peft_config(lm: nn.Module, settings: LoraSettings):
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    # GPT-2's projections are Conv1D (weights stored transposed): PEFT must be told, or it warns and guesses.
    conv1d = any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in settings.target_modules
                 for name, m in lm.named_modules())
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), fan_in_fan_out=conv1d, bias="none")


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise AdapterError("LoRA needs the peft package (pip install peft)") from err
    return peft


def attach_lora(lm: nn.Module, settings: LoraSettings, adapter_path: str | Path | None = None):
    """Inject LoRA layers into `lm` in place: new ones (B = 0, so the LM is unchanged at first) or a saved
    adapter folder's. Returns the PeftModel wrapper; `wrapper.get_base_model() is lm`."""
    peft = _peft()
    with warnings.catch_warnings():
        # PEFT probes transformers' deprecated is_gradient_checkpointing: a FutureWarning per model, not ours.
        warnings.simplefilter("ignore", FutureWarning)
        if adapter_path is None:
            return peft.get_peft_model(lm, _peft_config(lm, settings))
        return peft.PeftModel.from_pretrained(lm, str(adapter_path), is_trainable=True)


def lora_parameters(lm: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters (what LoRA training updates), in module order."""
    return [p for name, p in lm.named_parameters() if "lora_" in name]


def adapter_layer_parts(model: nn.Module) -> set[int]:
    """ids of every module inside a PEFT adapter layer of `model` (the LoRA layer and its base/A/B linears).

    Inference-time rewrites (model/packing.py, model/quantize.py) leave them as they are: PEFT's forward
    reads its inner linears' `.weight` (dtype casts, merges), which a packed or quantized layer lacks."""
    return {id(inner) for m in model.modules() if type(m).__module__.startswith("peft.tuners")
            for inner in m.modules()}


def merged_copy(wrapper) -> nn.Module:
    """A plain transformers LM with the adapter merged into its weights; the original is untouched."""
    return copy.deepcopy(wrapper).merge_and_unload()
