"""Re-plant known single-line bugs, one at a time, in a copy of src/, and check a fast test catches each.

    .venv/bin/python tests/mutation/plant_bugs.py            # all bugs
    .venv/bin/python tests/mutation/plant_bugs.py mlp_relu   # some of them

Each bug is a (file, original text, buggy text) edit applied to a fresh copy of src/ in a temporary
folder; the copy shadows the editable install through PYTHONPATH (checked: prefixcap.__file__ must
lie in the copy), and the listed non-slow tests run against it. A bug is "caught" when pytest
fails. The working tree is never modified. Exit status 1 if any bug is missed or cannot be planted
(its original text is gone: update the table), 0 otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Bug:
    name: str
    issue_class: str  # the bug class of issue 17 it stands for
    file: str  # under src/prefixcap
    original: str
    planted: str
    tests: tuple[str, ...]


BUGS = [
    Bug("mlp_relu", "MLP mapper Tanh -> ReLU", "model/mapping.py", "nn.Tanh(),", "nn.ReLU(),",
        ("tests/model/test_values_mapping.py",)),
    Bug("transformer_first_k", "transformer mapper returns the first K outputs", "model/mapping.py",
        "return h[:, self.cfg.clip_tokens:]", "return h[:, :self.cfg.prefix_length]", ("tests/model/test_values_mapping.py",)),
    Bug("transformer_no_queries", "learned queries unused", "model/mapping.py",
        "lm_dim)  # (B, L, D)\n        queries = self.prefix_const.unsqueeze(0).expand(b, -1, -1)",
        "lm_dim)  # (B, L, D)\n        queries = torch.zeros_like(self.prefix_const).unsqueeze(0).expand(b, -1, -1)",
        ("tests/model/test_values_mapping.py",)),
    Bug("full_logits_shift", "causal loss shifted by one (full-logits branch)", "model/captioning.py",
        "logits = logits[:, :t][targets_mask]", "logits = logits[:, 1:t + 1][targets_mask]", ("tests/model/test_values_model.py",)),
    Bug("full_logits_never", "soft-capped LMs sent through the hidden-state shortcut", "model/captioning.py",
        'return bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))',
        "return False", ("tests/model/test_values_model.py",)),
    Bug("hidden_shift", "causal loss shifted by one (hidden-state branch)", "model/captioning.py",
        "hidden = hidden[:, k - 1:k - 1 + t][targets_mask]", "hidden = hidden[:, k:k + t][targets_mask]",
        ("tests/model/test_values_model.py",)),
    Bug("collate_pairing", "collate pairs embeddings with the wrong captions", "data/loader.py",
        "embeddings = np.stack([e for _, e in samples])", "embeddings = np.stack([e for _, e in samples[::-1]])",
        ("tests/data/test_values_loader.py",)),
    Bug("collate_mask", "collate mask one short", "data/loader.py",
        "mask[i, :len(t)] = 1", "mask[i, :len(t) - 1] = 1", ("tests/data/test_values_loader.py",)),
    Bug("ignore_temperature", "sampling ignores temperature", "generation.py",
        'for name in (*self.inactive(), "max_new_tokens"):',
        'for name in (*self.inactive(), "max_new_tokens", "temperature"):', ("tests/caption/test_values_caption.py",)),
    Bug("ignore_top_p", "sampling ignores top_p", "generation.py",
        'for name in (*self.inactive(), "max_new_tokens"):',
        'for name in (*self.inactive(), "max_new_tokens", "top_p"):', ("tests/caption/test_values_caption.py",)),
    Bug("greedy_score_sum", "greedy scores a sum instead of a mean", "caption/captioner.py",
        "return (torch.where(mask, token_logp, 0.0).sum(1) / n).cpu().tolist()",
        "return (torch.where(mask, token_logp, 0.0).sum(1)).cpu().tolist()", ("tests/caption/test_values_caption.py",)),
    Bug("beam_score_sum", "beam scores a sum instead of the beam score", "caption/captioner.py",
        "return out.sequences_scores.float().cpu().tolist()",
        "return (out.sequences_scores.float().cpu() * torch.tensor(lengths)).tolist()", ("tests/caption/test_values_caption.py",)),
    Bug("score_without_eos", "scores leave the end-of-text out", "caption/captioner.py",
        "lengths = [c + 1 if h else c for c, h in zip(cut, has_eos.tolist())]",
        "lengths = [c for c, h in zip(cut, has_eos.tolist())]", ("tests/caption/test_values_caption.py",)),
    Bug("no_short_group_rescale", "gradient-accumulation rescale of a short group removed", "train/loop.py",
        "acc.backward(loss * (gas / group_size))", "acc.backward(loss)", ("tests/train/test_values_train.py",)),
    Bug("no_clipping", "gradient clipping removed", "train/loop.py",
        "self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)", "pass",
        ("tests/train/test_values_train.py",)),
    Bug("cider_raises", "validation CIDEr raising during training", "train/validation.py",
        "        try:\n            import numpy as np\n\n            from prefixcap.caption.captioner import Captioner",
        "        try:\n            raise RuntimeError('planted')\n            import numpy as np\n\n"
        "            from prefixcap.caption.captioner import Captioner", ("tests/train/test_values_train.py",)),
    Bug("tokenizer_no_lower", "simple caption tokenizer no longer lower-cases", "evaluate/metrics.py",
        '" ".join(_SIMPLE_TOKEN.findall(c.lower()))', '" ".join(_SIMPLE_TOKEN.findall(c))', ("tests/evaluate/test_values_metrics.py",)),
    Bug("per_image_sorted", "per-image scores attached in sorted key order", "evaluate/metrics.py",
        "for k, v in zip(keys, p):", "for k, v in zip(sorted(keys), p):", ("tests/evaluate/test_values_metrics.py",)),
    Bug("temp_stats_counted", "a temporary stats file counted as a finished shard", "data/shards.py",
        'for stats_path in sorted(shard_dir.glob("*.json")):',
        'for stats_path in sorted(p for p in shard_dir.iterdir() if ".json" in p.name and "arrow" not in p.name):',
        ("tests/data/test_values_shards.py",)),
    Bug("packed_conv1d_untransposed", "GPT-2's Conv1D packed without transposing its (in, out) weight",
        "model/packing.py", "weight = module.weight.t()  # Conv1D stores (in, out)", "weight = module.weight",
        ("tests/caption/test_packing.py",)),
    Bug("packed_gelu_kept", "GELU fused into c_fc but the separate activation still applied (GELU twice)",
        "model/packing.py", "setattr(module, act_name, nn.Identity())", "pass", ("tests/caption/test_packing.py",)),
    Bug("packed_lora_base", "LoRA layers' inner linears packed (PEFT then reads a missing .weight)",
        "model/packing.py", "weight = None if id(child) in adapter_parts else _packable(child)",
        "weight = _packable(child)", ("tests/caption/test_packing.py",)),
    Bug("quantize_lora", "LoRA layers' inner linears quantized (PEFT then reads a missing .weight)",
        "model/quantize.py", "if type(m) is nn.Linear and id(m) not in adapter_parts}",
        "if type(m) is nn.Linear}", ("tests/caption/test_quantize.py",)),
]


def _env(copy: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(copy / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def run_bug(bug: Bug) -> tuple[str, float, str]:
    """(outcome, seconds, detail); outcome is caught, MISSED or NOT PLANTED."""
    with tempfile.TemporaryDirectory(prefix=f"plant-{bug.name}-") as tmp:
        copy = Path(tmp)
        shutil.copytree(REPO / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        target = copy / "src" / "prefixcap" / bug.file
        text = target.read_text()
        if text.count(bug.original) != 1:
            return "NOT PLANTED", 0.0, f"original text found {text.count(bug.original)} times in {bug.file}"
        target.write_text(text.replace(bug.original, bug.planted))
        where = subprocess.run([sys.executable, "-c", "import prefixcap; print(prefixcap.__file__)"],
                               env=_env(copy), capture_output=True, text=True, cwd=REPO)
        if not where.stdout.strip().startswith(str(copy)):
            return "NOT PLANTED", 0.0, f"the copy does not shadow the install: {where.stdout.strip()}"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                               *bug.tests], env=_env(copy), capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - start
        failed = [ln.split(" - ")[0].removeprefix("FAILED ") for ln in proc.stdout.splitlines()
                  if ln.startswith(("FAILED", "ERROR"))]
        if proc.returncode == 1 and failed:
            return "caught", seconds, failed[0]
        if proc.returncode == 0:
            return "MISSED", seconds, "all tests passed"
        return "MISSED", seconds, f"pytest exit {proc.returncode}: {proc.stdout[-300:]}"


def main(argv: list[str]) -> int:
    chosen = [b for b in BUGS if not argv or b.name in argv]
    unknown = set(argv) - {b.name for b in BUGS}
    if unknown:
        print(f"plant_bugs: unknown bug(s) {sorted(unknown)}; known: {', '.join(b.name for b in BUGS)}",
              file=sys.stderr)
        return 2
    bad = 0
    print("| bug | issue class | outcome | time | first failing test |\n|---|---|---|---|---|")
    for bug in chosen:
        outcome, seconds, detail = run_bug(bug)
        bad += outcome != "caught"
        print(f"| `{bug.name}` | {bug.issue_class} | {outcome} | {seconds:.0f} s | `{detail}` |", flush=True)
    print(f"\n{len(chosen) - bad} of {len(chosen)} planted bugs caught by non-slow tests")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
