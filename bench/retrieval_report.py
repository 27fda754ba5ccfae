"""Tables and verdicts of bench.bench_retrieval: per-row means and spreads over seeds, docs/retrieval.md's figures."""

from __future__ import annotations

import math
import statistics

from bench.common import REPO, load_average

KEYS = ("colour", "shape", "position", "all", "cider", "train_seconds", "artifact_mb", "retrieval_ms")
BEGIN, END = "<!-- bench_retrieval:begin -->", "<!-- bench_retrieval:end -->"


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (test set, LM mode, model, datastore): mean, sample sd, min, max over seeds of every figure."""
    rows = []
    for test in dict.fromkeys(r["test"] for r in runs):
        for mode, model, store in dict.fromkeys((r["lm_mode"], r["model"], r["datastore"]) for r in runs):
            group = [r for r in runs if (r["test"], r["lm_mode"], r["model"], r["datastore"]) == (test, mode, model, store)]
            if group:
                keys = list(KEYS) + sorted({k for r in group for k in r if k.startswith("colour:")})
                rows.append({"test": test, "lm_mode": mode, "model": model, "datastore": store,
                             "seeds": [r["seed"] for r in group], **{k: _stats([r.get(k) for r in group]) for k in keys}})
    return rows


def _pct(f: dict) -> str:
    return "–" if math.isnan(f["mean"]) else f"{100 * f['mean']:.1f} ± {100 * f['sd']:.1f}"


def _find(rows: list[dict], mode: str, test: str, model: str, store: str) -> dict | None:
    return next((r for r in rows if (r["lm_mode"], r["test"], r["model"], r["datastore"]) == (mode, test, model, store)),
                None)


def _compare(a: dict, b: dict, key: str) -> tuple[float, float, float]:
    """(margin of means, worst seed of a minus best seed of b, the larger seed range), in points."""
    margin = a[key]["mean"] - b[key]["mean"]
    gap = a[key]["min"] - b[key]["max"]
    spread = max(a[key]["max"] - a[key]["min"], b[key]["max"] - b[key]["min"])
    return 100 * margin, 100 * gap, 100 * spread


def verdicts(rows: list[dict]) -> list[str]:
    """The two claims of the issue, per LM mode, each checked against the seed spread."""
    return [line for mode in dict.fromkeys(r["lm_mode"] for r in rows) for line in _verdicts(rows, mode)]


def _verdicts(rows: list[dict], mode: str) -> list[str]:
    lines = []
    base = _find(rows, mode, "unseen colours", "no retrieval", "none")
    swapped = _find(rows, mode, "unseen colours", "retrieval", "+ unseen-colour captions")
    if base and swapped:
        for key in ("colour", "all", *sorted(k for k in swapped if k.startswith("colour:"))):
            margin, gap, spread = _compare(swapped, base, key)
            ok = gap > 0 and margin > 2 * spread
            lines.append(f"- {mode} LM, unseen colours, {key.replace('colour:', 'named ')}: the swapped-in datastore gives {100 * swapped[key]['mean']:.1f} % vs "
                         f"{100 * base[key]['mean']:.1f} % without retrieval (margin {margin:+.1f} points; worst "
                         f"retrieval seed minus best baseline seed {gap:+.1f}; largest seed range {spread:.1f}): "
                         + ("**a lift far beyond the seed spread**." if ok else "**not a lift beyond the seed spread**."))
    seen_base = _find(rows, mode, "seen colours", "no retrieval", "none")
    seen_ret = _find(rows, mode, "seen colours", "retrieval", "training datastore")
    if seen_base and seen_ret:
        for key in ("all",):
            margin, gap, spread = _compare(seen_ret, seen_base, key)
            lo, hi = seen_base[key]["min"], seen_base[key]["max"]
            inside = margin >= -spread  # a loss no larger than the larger seed range
            lines.append(f"- {mode} LM, seen colours, {key}: retrieval (training datastore) {100 * seen_ret[key]['mean']:.1f} % vs "
                         f"{100 * seen_base[key]['mean']:.1f} % without (margin {margin:+.1f} points; baseline seeds "
                         f"{100 * lo:.1f}-{100 * hi:.1f} %): "
                         + ("nothing lost beyond the spread." if inside else "**a loss beyond the spread**."))
    return lines


def markdown(rows: list[dict], cfg, info: dict, total_s: float, sizes: dict, ds_timings: dict) -> str:
    head = ("| test images | LM | captioner | datastore at inference | colour | shape | position | **all correct** | "
            "CIDEr-D | train s | artifact MB | retrieval ms/image |")
    lines = [f"Measured by `python -m bench.bench_retrieval` in {total_s / 60:.1f} min on {info['cpu_count']} cores "
             f"({cfg.threads} torch thread), load average {info.get('load_average_start')} at start, "
             f"{load_average()} at end. Seeds {list(cfg.seeds)}; mean ± sample sd over seeds; {cfg.num_test} test "
             f"images per set; captioners trained on {cfg.num_seen_train} images of {', '.join(('red', 'green', 'blue', 'yellow'))} "
             f"only, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}, K={cfg.prefix_length}, "
             f"k={cfg.retrieval_k}.", "", head, "|" + "---|" * 12]
    for r in rows:
        ms = r["retrieval_ms"]["mean"]
        lines.append(f"| {r['test']} | {r['lm_mode']} | {r['model']} | {r['datastore']} | "
                     + " | ".join(_pct(r[k]) for k in ("colour", "shape", "position", "all"))
                     + f" | {r['cider']['mean']:.2f} ± {r['cider']['sd']:.2f} | {r['train_seconds']['mean']:.0f} | "
                     f"{r['artifact_mb']['mean']:.2f} | {'–' if math.isnan(ms) else f'{ms:.2f}'} |")
    per_colour = [r for r in rows if r["test"] == "unseen colours"]
    colours = sorted({k for r in per_colour for k in r if k.startswith("colour:")})
    if colours:
        lines += ["", "Unseen colours, one by one: the share of each colour's test images whose caption names it.", "",
                  "| LM | captioner | datastore at inference | " + " | ".join(c.split(":")[1] for c in colours) + " |",
                  "|" + "---|" * (3 + len(colours))]
        lines += [f"| {r['lm_mode']} | {r['model']} | {r['datastore']} | " + " | ".join(_pct(r[c]) for c in colours)
                  + " |" for r in per_colour]
    lines += ["", "Datastores: " + "; ".join(f"{n}: {s['captions']} captions, {s['mb']} MB" for n, s in sizes.items())
              + f" (built in {ds_timings.get('train_datastore_s')} s; the unseen-colour captions appended in "
              f"{ds_timings.get('append_s')} s).", "", *verdicts(rows), ""]
    return "\n".join(lines)


def write_docs(table: str) -> None:
    """Replace the measured section of docs/retrieval.md (between the markers) with this run's table."""
    path = REPO / "docs" / "retrieval.md"
    text = path.read_text() if path.is_file() else f"# Retrieval-augmented captioning\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{BEGIN}\n{table}\n{END}{after}")
    print(f"updated {path.relative_to(REPO)}")
