"""Patch-token prefixes vs the pooled CLIP vector on the scenes benchmark (prefixcap.demo.scenes).

One command from a clean checkout (`python -m bench.bench_patch_tokens`; 29 min measured on 2 shared cores):
  1. the scenes dataset (2-3 shapes, relations; held-out colour+shape pairs in half the test scenes)
  2. the tiny CLIP stand-in, contrastively trained on the training pairs (demo.clip_pretrain, 48 px)
  3. a tiny GPT-2 stand-in, its tokenizer trained on the captions and its weights pretrained as a
     language model on the training captions (text only), so a *frozen* LM knows the caption language
  4. `prefixcap preprocess --store_patch_tokens --patch_pool 2` of both splits (pooled vector and
     1 + 3x3 tokens in one dataset)
  5. `prefixcap train` for each mapper x LM mode x seed, all with the same settings, then greedy captions
     of the held-out scenes from the stored features, scored by parsing (demo.scenes.score_captions)
     and by CIDEr-D (prefixcap.evaluate.metrics, simple tokenizer: Java's PTB tokenizer adds seconds per call
     and changes nothing for these lower-case, punctuation-free captions)
Seeds vary the captioner only (mapper initialisation, batch order); data, CLIP and LM are fixed.
Writes bench/results/patch_tokens.json and bench/results/patch_tokens.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.common import (RESULTS, WORK, add_seeded_args, load_average, machine_info, print_header, seeded_config,
                          set_threads, write_result)

# name -> mapping_type; the pooled ones read the embedding column, the token ones the patch tokens.
VARIANTS = {"pooled + MLP": "mlp", "pooled + transformer": "transformer",
            "tokens + transformer": "transformer_tokens", "tokens + projector": "projector"}
LM_MODES = ("frozen", "fine-tuned")
SCORE_KEYS = ("count", "size", "colour", "shape", "relations", "all")
RELATION_KEYS = ("rel:left of", "rel:right of", "rel:above", "rel:below")


@dataclass
class BenchConfig:
    """Sizes and training settings; one setting for every variant (nothing is tuned per variant)."""

    workdir: str = str(WORK / "patch_tokens")
    num_train: int = 4000
    num_test: int = 300
    clip_steps: int = 1000
    lm_pretrain_steps: int = 800
    lm_width: int = 64
    lm_layers: int = 2
    patch_pool: int = 2
    prefix_length: int = 10  # K of the pooled mappers and of tokens + transformer (the projector's K is N)
    mapper_layers: int = 4
    mapper_heads: int = 4
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3  # the offline demo's rate for the same tiny models
    warmup_steps: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS)
    lm_modes: tuple[str, ...] = LM_MODES
    threads: int = 1
    results_name: str = "patch_tokens"


QUICK = {"num_train": 1500, "num_test": 120, "clip_steps": 400, "lm_pretrain_steps": 300, "epochs": 6,
         "seeds": (0, 1), "results_name": "patch_tokens_quick"}


@dataclass
class RunResult:
    """One trained captioner, scored on the held-out scenes."""

    variant: str
    lm_mode: str
    seed: int
    scores: dict[str, float]
    cider: float
    train_seconds: float
    artifact_mb: float
    prefix_length: int
    trainable_params: int
    final_loss: float | None = None
    image_path_agreement: float | None = None  # captions from images == captions from stored features
    examples: list[dict[str, str]] = field(default_factory=list)


def _run_cli(command: str, argv: list[str]) -> None:
    from prefixcap.cli import main

    print("$ prefixcap " + command + " " + " ".join(argv), flush=True)
    if main([command, *argv]):
        raise RuntimeError(f"`prefixcap {command}` failed")


# --------------------------------------------------------------------------- data, CLIP, LM
def build_data(cfg: BenchConfig, work: Path):
    from prefixcap.demo.scenes import SceneConfig, write_scenes

    ds = write_scenes(work / "data", SceneConfig(num_train=cfg.num_train, num_test=cfg.num_test))
    print(f"scenes: {cfg.num_train} train / {cfg.num_test} test ({'reused' if ds.reused else f'{ds.seconds:.0f} s'})")
    return ds


def _stamp_matches(folder: Path, stamp: dict) -> bool:
    path = folder / "bench_stamp.json"
    return path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(stamp))


def train_clip(cfg: BenchConfig, ds, work: Path) -> Path:
    """The tiny CLIP on (image, caption) training pairs; positives grouped by scene content."""
    from prefixcap.demo.clip_pretrain import ClipPretrainConfig, pretrain_clip
    from prefixcap.demo.synthetic import read_shards

    out = work / "clip"
    clip_cfg = ClipPretrainConfig(max_steps=cfg.clip_steps, image_size=ds.config.image_size, seed=0,
                                  num_threads=cfg.threads)
    stamp = {"data": ds.config.to_json(), "clip": asdict(clip_cfg)}
    if _stamp_matches(out, stamp):
        print(f"reusing the tiny CLIP in {out}")
        return out
    samples = list(read_shards(ds.shard_paths("train")))
    groups = [json.dumps(s.meta["scene"]["objects"], sort_keys=True) for s in samples]
    result = pretrain_clip([s.image for s in samples], [s.caption for s in samples], out, clip_cfg,
                           groups=groups, progress=False)
    print(f"tiny CLIP: {result.steps} steps in {result.seconds:.0f} s, loss {result.first_loss:.2f} -> "
          f"{result.final_loss:.2f}")
    (out / "bench_stamp.json").write_text(json.dumps(stamp))
    return out


def pretrain_lm(path: Path, captions: list[str], steps: int, batch_size: int = 64, lr: float = 2e-3) -> float:
    """Causal-LM pretraining of the tiny GPT-2 on caption text (eos-terminated); returns the last loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in captions]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = [ids[int(i)] for i in torch.randint(len(ids), (batch_size,), generator=generator)]
        longest = max(map(len, batch))
        x = torch.full((batch_size, longest), tok.eos_token_id)  # (B, T)
        mask = torch.zeros(batch_size, longest, dtype=torch.long)
        for i, row in enumerate(batch):
            x[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        labels = x.masked_fill(mask == 0, -100)
        for g in optimizer.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (1 - step / steps)
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(path))
    return float(loss.item())


def build_lm(cfg: BenchConfig, ds, work: Path) -> Path:
    from prefixcap.demo.synthetic import read_shards
    from prefixcap.demo.tiny_models import build_tiny_gpt2, default_corpus

    out = work / "lm"
    stamp = {"data": ds.config.to_json(), "width": cfg.lm_width, "layers": cfg.lm_layers,
             "steps": cfg.lm_pretrain_steps}
    if _stamp_matches(out, stamp):
        print(f"reusing the tiny GPT-2 in {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    captions = [c for s in read_shards(ds.shard_paths("train")) for c in s.meta["captions"]]
    build_tiny_gpt2(out, corpus=default_corpus() + captions, n_embd=cfg.lm_width, n_layer=cfg.lm_layers,
                    n_head=2, n_positions=128)
    start = time.perf_counter()
    loss = pretrain_lm(out, captions, cfg.lm_pretrain_steps)
    print(f"tiny GPT-2 pretrained on {len(captions)} captions: {cfg.lm_pretrain_steps} steps in "
          f"{time.perf_counter() - start:.0f} s, final loss {loss:.3f}")
    (out / "bench_stamp.json").write_text(json.dumps(stamp))
    return out


def preprocess(cfg: BenchConfig, ds, clip: Path, lm: Path, work: Path, split: str) -> Path:
    out = work / f"pre_{split}"
    _run_cli("preprocess", [
        "--input_dataset", *ds.shard_paths(split), "--input_format", "webdataset", "--output_folder", str(out),
        "--wds_image_key", ds.config.image_format, "--wds_caption_key", "txt", "--clip_model", str(clip),
        "--tokenizer_model_type", "gpt2", "--tokenizer_model_variant", str(lm), "--max_token_length", "48",
        "--store_patch_tokens", "--patch_pool", str(cfg.patch_pool), "--batch_size", "256",
        "--num_prepro_workers", "1", "--device", "cpu", "--no_progress", "--overwrite"])
    return out


# --------------------------------------------------------------------------- training and scoring
def train_one(cfg: BenchConfig, data: Path, out: Path, variant: str, lm_mode: str, seed: int) -> tuple[Path, float]:
    """`prefixcap train` of one captioner; returns (final artifact, wall seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--data_dir", str(data), "--output_dir", str(out), "--mapping_type", VARIANTS[variant],
            "--prefix_length", str(cfg.prefix_length), "--num_layers", str(cfg.mapper_layers),
            "--num_attention_heads", str(cfg.mapper_heads), "--epochs", str(cfg.epochs),
            "--batch_size", str(cfg.batch_size), "--lr", str(cfg.lr), "--warmup_steps", str(cfg.warmup_steps),
            "--seed", str(seed), "--save_every_epochs", "0", "--save_every_steps", "1000000",
            "--num_workers", "0", "--val_fraction", "0", "--eval_cider_images", "0", "--threads", str(cfg.threads)]
    if lm_mode == "frozen":
        argv.append("--only_prefix")
    start = time.perf_counter()
    _run_cli("train", argv)
    seconds = time.perf_counter() - start
    return out / "demo_model_final.ckpt", seconds


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def held_out_scenes(ds) -> tuple[dict[str, object], dict[str, list[str]]]:
    """key -> Scene and key -> reference captions of the test split."""
    from prefixcap.demo.scenes import Scene
    from prefixcap.demo.synthetic import read_shards

    scenes, refs = {}, {}
    for s in read_shards(ds.shard_paths("test")):
        scenes[s.key] = Scene.from_json(s.meta["scene"])
        refs[s.key] = s.meta["captions"]
    return scenes, refs


def test_inputs(test_data: Path) -> tuple[list[str], "object", "object"]:
    """Keys, pooled embeddings (N_img, C) and patch tokens (N_img, N, C) of the preprocessed test split."""
    import numpy as np

    from prefixcap import load_preprocessed

    data = load_preprocessed(test_data)
    keys, pooled, tokens = [], [], []
    for i in range(data.num_images):
        key, emb = data.image(i)
        keys.append(key)
        pooled.append(emb)
        tokens.append(data.image_patch_tokens(i))
    return keys, np.stack(pooled), np.stack(tokens)


def score_run(model_dir: Path, inputs, scenes: dict, refs: dict, vocab, ds, check_images: bool) -> dict:
    """Greedy captions of the held-out scenes from stored features -> parsed scores, CIDEr-D, examples."""
    from prefixcap.caption.captioner import Captioner
    from prefixcap.demo.scenes import score_captions
    from prefixcap.evaluate.metrics import coco_scores

    keys, pooled, tokens = inputs
    cap = Captioner.from_pretrained(model_dir)
    features = tokens if cap.config.mapping.takes_tokens else pooled
    captions = cap.caption_embeddings(features, batch_size=100)
    scores = score_captions(captions, [scenes[k] for k in keys], vocab)
    cider = coco_scores(dict(zip(keys, captions)), {k: refs[k] for k in keys}, metrics=["cider"],
                        tokenizer="simple").corpus["CIDEr"]
    agreement = None
    if check_images:  # the same model captioning the test images themselves (tokens computed on the fly)
        from prefixcap.demo.synthetic import read_shards

        images = {s.key: s.image for s in read_shards(ds.shard_paths("test"))}
        from_images = cap.caption([images[k] for k in keys], batch_size=100)
        agreement = sum(a == b for a, b in zip(captions, from_images)) / len(keys)
    examples = [{"key": k, "predicted": c, "reference": refs[k][0]} for k, c in list(zip(keys, captions))[:4]]
    return {"scores": scores, "cider": float(cider), "agreement": agreement, "examples": examples,
            "prefix_length": cap.config.prefix_length,
            "trainable": sum(p.numel() for p in cap.model.mapper.parameters())
            + (0 if cap.config.only_prefix else sum(p.numel() for p in cap.model.lm.parameters()))}


def _final_loss(out: Path) -> float | None:
    """The last epoch's mean training loss, from the run's {prefix}_summary.json."""
    try:
        return round(float(json.loads((out / "demo_model_summary.json").read_text())["epoch_train_losses"][-1]), 4)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def run_all(cfg: BenchConfig, data: Path, test_data: Path, ds, work: Path) -> list[RunResult]:
    from prefixcap.demo.scenes import scene_vocabulary

    scenes, refs = held_out_scenes(ds)
    inputs = test_inputs(test_data)
    vocab = scene_vocabulary(ds.config)
    runs: list[RunResult] = []
    for lm_mode in cfg.lm_modes:
        for variant in cfg.variants:
            for seed in cfg.seeds:
                out = work / "models" / f"{VARIANTS[variant]}_{lm_mode}_{seed}"
                model_dir, seconds = train_one(cfg, data, out, variant, lm_mode, seed)
                check = seed == cfg.seeds[0] and VARIANTS[variant] in ("transformer_tokens", "projector")
                r = score_run(model_dir, inputs, scenes, refs, vocab, ds, check)
                runs.append(RunResult(variant, lm_mode, seed, r["scores"], r["cider"], round(seconds, 1),
                                      round(_folder_mb(model_dir), 3), r["prefix_length"], r["trainable"],
                                      _final_loss(out), r["agreement"], r["examples"]))
                print(f"[{variant} / {lm_mode} / seed {seed}] all {r['scores']['all']:.3f} relations "
                      f"{r['scores']['relations']:.3f} CIDEr-D {r['cider']:.3f} ({seconds:.0f} s)", flush=True)
                shutil.rmtree(out / "demo_model_latest.ckpt", ignore_errors=True)
    return runs


# --------------------------------------------------------------------------- what the features hold
def _cell_labels(scene, attribute: str) -> list[str]:
    """For each of the 9 cells: the attribute of the object there, or 'empty'."""
    from prefixcap.demo.scenes import GRID

    at = {(o.row, o.col): getattr(o, attribute) for o in scene.objects}
    return [at.get((r, c), "empty") for r in range(GRID) for c in range(GRID)]


def probe_features(ds, train_data: Path, test_data: Path, max_train: int = 2000) -> dict[str, dict[str, float]]:
    """Linear-probe accuracy, averaged over the 9 cells, of each cell's colour / shape from the pooled
    vector vs from the flattened patch tokens (frozen features, fit on train, scored on test)."""
    import torch

    from prefixcap.demo.clip_pretrain import linear_probe_accuracy
    from prefixcap.demo.scenes import Scene
    from prefixcap.demo.synthetic import read_shards

    def load(path: Path, split: str):
        scenes = {s.key: Scene.from_json(s.meta["scene"]) for s in read_shards(ds.shard_paths(split))}
        keys, pooled, tokens = test_inputs(path)
        n = min(len(keys), max_train)
        return ([scenes[k] for k in keys[:n]], torch.from_numpy(pooled[:n]),
                torch.from_numpy(tokens[:n].reshape(n, -1)))

    tr_scenes, tr_pooled, tr_tokens = load(train_data, "train")
    te_scenes, te_pooled, te_tokens = load(test_data, "test")
    out: dict[str, dict[str, float]] = {}
    for attribute in ("colour", "shape"):
        ytr = [_cell_labels(s, attribute) for s in tr_scenes]
        yte = [_cell_labels(s, attribute) for s in te_scenes]
        for name, xtr, xte in (("pooled", tr_pooled, te_pooled), ("tokens", tr_tokens, te_tokens)):
            accs = [linear_probe_accuracy(xtr, [y[c] for y in ytr], xte, [y[c] for y in yte]) for c in range(9)]
            out.setdefault(name, {})[f"cell {attribute}"] = sum(accs) / len(accs)
    return out


# --------------------------------------------------------------------------- tables
def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[RunResult]) -> list[dict]:
    """One row per (LM mode, variant): mean, sample sd, min and max over seeds of every figure."""
    rows = []
    for lm_mode in dict.fromkeys(r.lm_mode for r in runs):
        for variant in dict.fromkeys(r.variant for r in runs):
            group = [r for r in runs if (r.variant, r.lm_mode) == (variant, lm_mode)]
            if not group:
                continue
            row: dict = {"variant": variant, "lm_mode": lm_mode, "seeds": [r.seed for r in group],
                         "prefix_length": group[0].prefix_length, "trainable_params": group[0].trainable_params}
            figures = {k: [r.scores[k] for r in group] for k in (*SCORE_KEYS, *RELATION_KEYS)}
            figures.update(cider=[r.cider for r in group], train_seconds=[r.train_seconds for r in group],
                           artifact_mb=[r.artifact_mb for r in group])
            for k, values in figures.items():
                mean, sd = _mean_sd(values)
                row[k] = {"mean": mean, "sd": sd, "min": min(values), "max": max(values)}
            rows.append(row)
    return rows


def _pct(f: dict) -> str:
    if math.isnan(f["mean"]):
        return "–"  # no clause with this relation was stated
    return f"{100 * f['mean']:.1f} ± {100 * f['sd']:.1f}"


def relation_margins(rows: list[dict]) -> list[str]:
    """Per LM mode: best token variant vs best pooled variant on scene-level relations, against the spread."""
    lines = []
    for lm_mode in dict.fromkeys(r["lm_mode"] for r in rows):
        mode = [r for r in rows if r["lm_mode"] == lm_mode]
        pooled = [r for r in mode if r["variant"].startswith("pooled")]
        tokens = [r for r in mode if r["variant"].startswith("tokens")]
        if not pooled or not tokens:
            continue
        bp = max(pooled, key=lambda r: r["relations"]["mean"])
        for t in tokens:
            margin = t["relations"]["mean"] - bp["relations"]["mean"]
            gap = t["relations"]["min"] - bp["relations"]["max"]  # > 0: every seed of t beats every seed of bp
            spread = max(t["relations"]["max"] - t["relations"]["min"], bp["relations"]["max"] - bp["relations"]["min"])
            verdict = "beats" if margin > spread and gap > 0 else "does not clearly beat"
            lines.append(f"- {lm_mode} LM: {t['variant']} {verdict} the best pooled variant ({bp['variant']}) on "
                         f"relations: {100 * t['relations']['mean']:.1f} % vs {100 * bp['relations']['mean']:.1f} % "
                         f"(margin {100 * margin:+.1f} points; largest seed spread {100 * spread:.1f} points; "
                         f"worst token seed minus best pooled seed {100 * gap:+.1f} points)")
    return lines


def markdown(rows: list[dict], cfg: BenchConfig, info: dict, total_s: float) -> str:
    head = ("| LM | prefix | K | count | size | colour | shape | **relations** | **all correct** | CIDEr-D | "
            "train s | artifact MB |")
    lines = [f"Held-out scenes: {cfg.num_test}; training images: {cfg.num_train}; seeds {list(cfg.seeds)}; "
             f"mean ± sample sd over seeds, percentages of held-out scenes. Total {total_s / 60:.1f} min on "
             f"{info['cpu_count']} cores ({cfg.threads} torch thread), load average "
             f"{info.get('load_average_start')} at start, {load_average()} at end.", "",
             head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['lm_mode']} | {r['variant']} | {r['prefix_length']} | "
                     + " | ".join(_pct(r[k]) for k in ("count", "size", "colour", "shape", "relations", "all"))
                     + f" | {r['cider']['mean']:.2f} ± {r['cider']['sd']:.2f} | {r['train_seconds']['mean']:.0f} | "
                     f"{r['artifact_mb']['mean']:.2f} |")
    lines += ["", "Per relation word: share of the stated clauses with that relation that are true.", "",
              "| LM | prefix | left of | right of | above | below |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lm_mode']} | {r['variant']} | " + " | ".join(_pct(r[k]) for k in RELATION_KEYS) + " |")
    lines += ["", *relation_margins(rows), ""]
    return "\n".join(lines)


def probe_table(probe: dict[str, dict[str, float]]) -> str:
    lines = ["", "Linear probes of the frozen CLIP features (held-out accuracy of each cell's content, mean over the 9 "
             "cells; chance of always saying 'empty' is about 72 %):", "",
             "| features | cell colour | cell shape |", "|---|---|---|"]
    lines += [f"| {name} | {100 * v['cell colour']:.1f} % | {100 * v['cell shape']:.1f} % |" for name, v in probe.items()]
    return "\n".join(lines) + "\n"


def agreement_line(runs: list[RunResult]) -> str:
    checked = [r for r in runs if r.image_path_agreement is not None]
    if not checked:
        return ""
    share = statistics.fmean(r.image_path_agreement for r in checked)
    return (f"\nCaptions from the test images (tokens computed on the fly) equal those from the stored float16 tokens "
            f"for {100 * share:.1f} % of images ({len(checked)} token models checked).\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_patch_tokens", description=__doc__.splitlines()[0])
    add_seeded_args(p, "reduced sizes and 2 seeds (~6 min): a smoke run", "scratch folder (default bench/_work/patch_tokens)")
    p.add_argument("--lm_modes", nargs="+", choices=LM_MODES, default=None)
    args = p.parse_args(argv)
    cfg = BenchConfig(threads=args.threads)
    cfg = seeded_config(cfg, args, QUICK, WORK / "patch_tokens_quick")
    if args.lm_modes:
        cfg = replace(cfg, lm_modes=tuple(args.lm_modes))
    return run_bench(cfg)


def run_bench(cfg: BenchConfig) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    set_threads(cfg.threads)
    info = machine_info()
    print_header("patch tokens vs pooled vector (scenes)", asdict(cfg), info)
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stages: dict[str, float] = {}
    t = time.perf_counter()
    ds = build_data(cfg, work)
    clip = train_clip(cfg, ds, work)
    stages["data + CLIP"] = time.perf_counter() - t
    t = time.perf_counter()
    lm = build_lm(cfg, ds, work)
    stages["LM"] = time.perf_counter() - t
    t = time.perf_counter()
    data, test_data = (preprocess(cfg, ds, clip, lm, work, split) for split in ("train", "test"))
    stages["preprocess"] = time.perf_counter() - t
    probe = probe_features(ds, data, test_data)
    print(f"linear probes of the frozen features (cell colour / shape, mean over cells): {probe}", flush=True)
    t = time.perf_counter()
    runs = run_all(cfg, data, test_data, ds, work)
    stages["train + score"] = time.perf_counter() - t
    total = time.perf_counter() - start
    rows = summarize(runs)
    table = markdown(rows, cfg, info, total) + probe_table(probe) + agreement_line(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{cfg.results_name}.md").write_text(table)
    print("\n" + table)
    write_result(cfg.results_name, asdict(cfg), info,
                 {"rows": rows, "runs": [asdict(r) for r in runs], "probe": probe,
                  "stage_seconds": {k: round(v, 1) for k, v in stages.items()}, "total_seconds": round(total, 1)},
                 notes=["CIDEr-D with the simple tokenizer (no Java)",
                        "seeds vary the captioner only; data, CLIP and LM pretraining are fixed"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
