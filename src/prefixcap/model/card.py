"""Model cards: the README.md every saved artifact carries, with the Hugging Face Hub's metadata header.

The card is rendered from config.json and `model_card.json` (the facts the trainer or `prefixcap push`
knew: training data counts from the dataset's manifest, the run, the last evaluation), so saving the
model again, or pushing it, renders the same card.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefixcap.model.config import CaptionConfig

CARD_DATA = "model_card.json"
LIBRARY_NAME = "prefixcap"
PIPELINE_TAG = "image-to-text"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(name: str | None) -> str | None:
    """`name` when it can be a Hub model/dataset id (not a local path), else None."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return None
    return name if _HUB_ID.match(name) else None


def clip_hub_id(name: str) -> str | None:
    """The Hub id of the CLIP encoder (OpenAI names like ViT-B/32 mapped to their Hugging Face port)."""
    from prefixcap.model.encoders import OPENAI_TO_HF

    return OPENAI_TO_HF.get(name) or hub_id(name)


def card_metadata(config: "CaptionConfig", info: dict[str, Any]) -> dict[str, Any]:
    """The YAML header's fields (the Hub reads library_name, pipeline_tag, base_model, datasets, tags)."""
    base = [m for m in (hub_id(config.language_model), clip_hub_id(config.clip_model)) if m]
    datasets = [d for d in (info.get("training_data") or {}).get("datasets", []) if hub_id(d)]
    tags = ["image-captioning", "clipcap", "prefixcap", f"lm-{config.lm_mode}"]
    if config.lora is not None:
        tags += ["lora", "peft"]
    meta: dict[str, Any] = {"library_name": LIBRARY_NAME, "pipeline_tag": PIPELINE_TAG, "tags": tags}
    if base:
        meta["base_model"] = base
    if datasets:
        meta["datasets"] = datasets
    return meta


def _yaml(meta: dict[str, Any]) -> str:
    from huggingface_hub import ModelCardData

    return ModelCardData(**meta).to_yaml()


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "", [])]
    return lines


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_card(config: "CaptionConfig", info: dict[str, Any] | None = None) -> str:
    """The README.md text: metadata header, what the model is, its config, training data, last evaluation."""
    info = info or {}
    m = config.mapping
    lm_modes = {"frozen": "frozen (only the mapping network was trained; the LM is loaded by name)",
                "lora": "LoRA adapters (the adapter is stored in lm_adapter/; the base LM is loaded by name)",
                "fine-tuned": "fine-tuned (its weights are stored in lm/)"}
    out = ["---", _yaml(card_metadata(config, info)).rstrip(), "---", "",
           "# prefixcap image captioner", "",
           f"A ClipCap-style captioner: CLIP `{config.clip_model}` image embeddings are mapped by a "
           f"{m.mapping_type} network into {m.prefix_length} prefix embeddings of the language model "
           f"`{config.language_model}`, which writes the caption.", "",
           "```python", "from prefixcap.caption.captioner import Captioner", "",
           "captioner = Captioner.from_pretrained(\"THIS_FOLDER_OR_REPO\")",
           "print(captioner.caption([\"image.jpg\"]))", "```", "",
           "or `prefixcap caption --model THIS_FOLDER_OR_REPO image.jpg`.", "", "## Configuration", ""]
    rows: list[tuple[str, Any]] = [
        ("CLIP encoder", f"`{config.clip_model}` ({m.prefix_size}-d embeddings"
                         f"{', L2-normalised' if config.normalize_prefix else ''})"),
        ("language model", f"`{config.language_model}` ({config.lm_family})"),
        ("LM training", lm_modes[config.lm_mode]),
        ("trained on", "CLIP text embeddings of captions, no image (docs/text_only.md)" if config.trained_on == "text"
         else "CLIP image embeddings"),
        *([("training noise", f"Gaussian, variance {config.noise_variance:g} on the normalised embeddings (CapDec)")]
          if config.noise_variance else []),
        ("mapping network", f"{m.mapping_type}, prefix length K={m.prefix_length}, LM width {m.lm_dim}"
                            + (f", {m.num_layers} layers" if m.mapping_type == "transformer" else "")),
        ("max caption tokens", config.max_token_length),
    ]
    if config.lora is not None:
        lo = config.lora
        rows.append(("LoRA", f"rank {lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g}, on "
                             + ", ".join(f"`{t}`" for t in lo.target_modules)))
    out += _table(rows)
    data = info.get("training_data") or {}
    if data:
        out += ["", "## Training data", ""]
        out += _table([(k.replace("_", " "), _number(v) if not isinstance(v, list) else ", ".join(map(str, v)))
                       for k, v in data.items()])
    run = info.get("training") or {}
    if run:
        out += ["", "## Training", ""]
        out += _table([(k.replace("_", " "), _number(v)) for k, v in run.items()])
    evaluation = info.get("evaluation") or {}
    out += ["", "## Evaluation", ""]
    if evaluation:
        out += _table([(k.replace("_", " "), _number(v)) for k, v in evaluation.items()])
    else:
        out.append("No evaluation recorded (run `prefixcap evaluate --model ...`, then "
                   "`prefixcap push MODEL REPO --evaluation RESULTS.json`).")
    out += ["", "Made with prefixcap (ClipCap: Mokady et al., 2021, arXiv:2111.09734).", ""]
    return "\n".join(out)


def evaluation_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a `prefixcap evaluate` results json worth a card line (metrics, image count)."""
    metrics = results.get("metrics") if isinstance(results.get("metrics"), dict) else results
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    counts = results.get("counts") if isinstance(results.get("counts"), dict) else {}
    out.update({f"{k} (count)": v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)})
    return out
