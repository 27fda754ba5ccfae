"""The evaluation report: the Markdown table (paper layout) and the files an evaluation writes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------
# (column label, metric name, scale) in the order papers print them; scale x100 as published.
TABLE_COLUMNS = (
    ("B@1", "Bleu_1", 100), ("B@2", "Bleu_2", 100), ("B@3", "Bleu_3", 100), ("B@4", "Bleu_4", 100),
    ("METEOR", "METEOR", 100), ("ROUGE-L", "ROUGE_L", 100), ("CIDEr", "CIDEr", 100), ("SPICE", "SPICE", 100),
    ("CLIP-S", "CLIPScore", 100), ("RefCLIP-S", "RefCLIPScore", 100),
)
PAPER_COLUMNS = ("B@4", "METEOR", "CIDEr", "SPICE")
# Mokady et al. (2021), COCO Karpathy test: shown beside a run on that split for comparison.
PAPER_RESULTS = (
    ("ClipCap paper: transformer mapper, frozen GPT-2", {"B@4": 33.53, "METEOR": 27.45, "CIDEr": 113.08,
                                                         "SPICE": 21.05}),
    ("ClipCap paper: MLP mapper, fine-tuned GPT-2", {"B@4": 32.15, "METEOR": 27.1, "CIDEr": 108.35, "SPICE": 20.12}),
)


def _cell(value: Any, scale: float) -> str:
    return "–" if value is None else f"{value * scale:.2f}"


def markdown_report(result: Mapping[str, Any], name: str) -> str:
    """The paper layout (B@4, METEOR, CIDEr, SPICE), then every figure, diversity and notices."""
    figures, counts = result["metrics"], result["counts"]
    cols = [c for c in TABLE_COLUMNS if c[1] in figures]
    paper = [c for c in cols if c[0] in PAPER_COLUMNS]
    lines = [f"# Evaluation: {name}", ""]
    if paper:
        lines += ["ClipCap paper layout (x100):", "",
                  "| model | " + " | ".join(c[0] for c in paper) + " |",
                  "|---|" + "---:|" * len(paper),
                  f"| {name} | " + " | ".join(_cell(figures[c[1]], c[2]) for c in paper) + " |"]
        settings = result["settings"]
        if settings.get("reference_format") == "karpathy" and settings.get("split") == "test":
            lines += [f"| {label} | " + " | ".join(f"{row[c[0]]:.2f}" for c in paper) + " |"
                      for label, row in PAPER_RESULTS]
        lines.append("")
    if cols:
        lines += ["All metrics (x100; CLIP-S on Hessel et al.'s 0-2.5 scale, x100):", "",
                  "| model | " + " | ".join(c[0] for c in cols) + " |",
                  "|---|" + "---:|" * len(cols),
                  f"| {name} | " + " | ".join(_cell(figures[c[1]], c[2]) for c in cols) + " |", ""]
    lines += ["| images scored | mean length (words) | vocabulary | distinct captions |", "|---:|---:|---:|---:|",
              f"| {counts['scored']} | {figures['mean_length_words']:.2f} | {figures['vocabulary_size']} | "
              f"{figures['distinct_captions']} ({100 * figures['distinct_caption_share']:.1f}%) |", ""]
    clip = result["settings"].get("clip", {})
    if clip.get("used"):
        lines.append(f"CLIPScore model: {clip['model']} ({clip.get('resolved')}), images from {clip['image_source']}.")
    if result["settings"].get("tokenizer"):
        lines.append(f"Tokenizer: {result['settings']['tokenizer']}.")
    if result["notices"]:
        lines += ["", "Notices:", ""] + [f"- {n}" for n in result["notices"]]
    return "\n".join(lines) + "\n"


def write_outputs(result: Mapping[str, Any], output_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """metrics.json (figures + settings + counts), metrics.md and predictions.jsonl (per image)."""
    from prefixcap.runs import atomic_write_bytes, atomic_write_json

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "per_image"}
    paths = {"json": out / "metrics.json", "markdown": out / "metrics.md", "predictions": out / "predictions.jsonl"}
    atomic_write_json(paths["json"], summary)
    atomic_write_bytes(paths["markdown"], markdown_report(result, name).encode())
    lines = [json.dumps({"key": k, **v}, ensure_ascii=False) for k, v in result["per_image"].items()]
    atomic_write_bytes(paths["predictions"], ("\n".join(lines) + "\n" if lines else "").encode())
    return paths
