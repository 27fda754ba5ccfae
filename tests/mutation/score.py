"""Summarise a mutmut run (mutants/**/*.meta) per module for the core functions `make mutate` covers.

    .venv/bin/python tests/mutation/score.py [GLOB ...]    # default: the globs in CORE
    .venv/bin/python tests/mutation/score.py --globs       # print CORE (what `make mutate` runs)

Killed share = killed / (killed + survived + no tests + timeout + suspicious); mutants not yet
checked are counted separately. Prints the surviving mutant names (see one with `mutmut show NAME`).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

# The core functions of issue 17: mappers, the model's loss, the training step, collate, generation
# settings and scores, shard resume, the COCO metrics. `make mutate` runs exactly these.
CORE = [
    "prefixcap.model.mapping.*",
    "prefixcap.model.config.xǁCaptionConfigǁ*", "prefixcap.model.captioning.x__needs_full_logits*",
    "prefixcap.model.captioning.xǁCaptionModelǁ__init__*", "prefixcap.model.captioning.xǁCaptionModelǁset_only_prefix*",
    "prefixcap.model.captioning.xǁCaptionModelǁtrain*", "prefixcap.model.captioning.xǁCaptionModelǁprefix*",
    "prefixcap.model.captioning.xǁCaptionModelǁforward*", "prefixcap.model.captioning.xǁCaptionModelǁ_causal_loss*",
    "prefixcap.model.captioning.xǁCaptionModelǁ_seq2seq_loss*",
    "prefixcap.train.loop.x__group_seed*", "prefixcap.train.loop.xǁTrainingLoopǁrun*",
    "prefixcap.train.validation.xǁValidatorǁcider*",
    "prefixcap.train.loop.xǁTrainingLoopǁ_run_epoch*", "prefixcap.train.loop.xǁTrainingLoopǁ_train_micro_batch*",
    "prefixcap.train.loop.xǁTrainingLoopǁ_optimizer_step*",
    "prefixcap.train.loop.xǁTrainingLoopǁ_after_optimizer_step*",
    "prefixcap.train.loop.xǁTrainingLoopǁ_show_progress*", "prefixcap.train.loop.xǁTrainingLoopǁ_end_epoch*",
    "prefixcap.train.loop.xǁTrainingLoopǁ_finish*",
    "prefixcap.data.loader.x_collate*",
    "prefixcap.generation.xǁGenerationSettingsǁ*", "prefixcap.generation.x_field_problem*",
    "prefixcap.generation.xǁRangeǁcontains*",
    "prefixcap.caption.captioner.xǁCaptionerǁ_generate_kwargs*", "prefixcap.caption.captioner.x__trim_at_eos*",
    "prefixcap.caption.captioner.x__sequence_scores*",
    "prefixcap.data.shards.x_completed_shards*", "prefixcap.runs.x_atomic_write_bytes*",
    "prefixcap.runs.x_atomic_write_json*", "prefixcap.data.shards.x_write_shard*",
    "prefixcap.evaluate.metrics.x_simple_tokenize*", "prefixcap.evaluate.metrics.x_words*", "prefixcap.evaluate.metrics.x_coco_scores*",
    "prefixcap.evaluate.metrics.x_diversity_stats*",
]
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked", 37: "killed"}


def main(globs: list[str]) -> int:
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("score: no mutants/ folder here; run `make mutate` first", file=sys.stderr)
        return 2
    per_module: dict[str, Counter] = defaultdict(Counter)
    survivors: list[str] = []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for name, code in codes.items():
            if not any(fnmatch.fnmatch(name, g) for g in globs):
                continue
            module = name.split(".x")[0]
            status = STATUS.get(code, "suspicious")
            per_module[module][status] += 1
            if status in ("survived", "no tests", "timeout", "suspicious"):
                survivors.append(f"{status}: {name}")
    total: Counter = Counter()
    print("| module | mutants | killed | survived | no tests | timeout/suspicious | not checked | killed share |")
    print("|---|---|---|---|---|---|---|---|")
    for module, c in sorted(per_module.items()):
        total.update(c)
        print(_row(module, c))
    print(_row("**all core**", total))
    if survivors:
        print("\nnot killed:\n" + "\n".join(sorted(survivors)))
    return 0


def _row(label: str, c: Counter) -> str:
    checked = c["killed"] + c["survived"] + c["no tests"] + c["timeout"] + c["suspicious"]
    share = f"{100 * c['killed'] / checked:.1f} %" if checked else "-"
    n = sum(c.values())
    return (f"| {label} | {n} | {c['killed']} | {c['survived']} | {c['no tests']} | "
            f"{c['timeout'] + c['suspicious']} | {c['not checked']} | {share} |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--globs"]:
        print("\n".join(CORE))
        sys.exit(0)
    sys.exit(main(sys.argv[1:] or CORE))
