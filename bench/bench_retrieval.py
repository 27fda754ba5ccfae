"""Retrieval-augmented captioning on colours the captioner never saw (SmallCap-style datastore swap).

One command from a clean checkout (`python -m bench.bench_retrieval`; writes docs/retrieval.md):
  1. three synthetic shape datasets (prefixcap.demo.synthetic): "world" with all six colours (the CLIP
     stand-in's and the LM's pretraining data), "seen" with four colours (the captioner's training
     images, and in-domain test images), "unseen" with the other two (test images, and text-only
     captions for the swapped-in datastore)
  2. the tiny CLIP stand-in, contrastively trained on the world pairs (it knows every colour)
  3. a tiny GPT-2 whose tokenizer and pretraining text cover every word: pretrained as an LM on the world
     captions (half single captions, half documents of 2-4 wordings of one image joined by ". ", the kind
     of repetition ordinary text is full of)
  4. `prefixcap preprocess` of the seen training images and both test sets; `prefixcap datastore build` of
     the seen training captions (5 wordings per image), and a copy with `--append` of the unseen-colour
     captions (text only: no image of those colours is ever trained on)
  5. per LM mode (frozen, LoRA, fine-tuned) and seed, with one training setting for all: a captioner
     without retrieval, and one trained with `--datastore` (k = 4); each scored on both test sets under
     every datastore it can use
Seeds vary the captioners only; data, CLIP, LM and datastores are fixed. Results: bench/results/retrieval.json,
docs/retrieval.md (the measured section between the markers).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.common import (REPO, WORK, add_seeded_args, load_average, machine_info, print_header, seeded_config,
                          set_threads, write_result)

ALL_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SEEN = ("red", "green", "blue", "yellow")
UNSEEN = ("purple", "orange")


@dataclass
class BenchConfig:
    """Sizes and the one training setting every captioner gets (nothing is tuned per row)."""

    workdir: str = str(WORK / "retrieval")
    num_world: int = 4000
    num_seen_train: int = 3000
    num_unseen_text: int = 600  # unseen-colour images whose captions (only) go into the swapped datastore
    num_test: int = 200  # per test set
    clip_steps: int = 800
    lm_pretrain_steps: int = 800
    lm_width: int = 64
    lm_layers: int = 2
    retrieval_k: int = 4
    # Every LM mode prefixcap trains, each a row: frozen (--only_prefix, SmallCap also freezes its LM),
    # LoRA (--lora_rank 8) and fine-tuned (the training default).
    lm_modes: tuple[str, ...] = ("frozen", "lora", "fine-tuned")
    epochs: int = 12  # enough for the no-retrieval baseline to caption its own colours well (measured)
    batch_size: int = 64
    lr: float = 2e-3  # the offline demo's rate for the same tiny models
    warmup_steps: int = 50
    prefix_length: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    results_name: str = "retrieval"
    write_docs: bool = True


QUICK = {"num_world": 1500, "num_seen_train": 1200, "num_unseen_text": 300, "num_test": 100, "clip_steps": 300,
         "lm_pretrain_steps": 300, "epochs": 5, "seeds": (0, 1), "results_name": "retrieval_quick",
         "write_docs": False}


def _run_cli(command: str, argv: list[str]) -> None:
    from prefixcap.cli import main

    print("$ prefixcap " + command + " " + " ".join(argv), flush=True)
    if main([command, *argv]):
        raise RuntimeError(f"`prefixcap {command}` failed")


def _stamp_matches(folder: Path, stamp: dict) -> bool:
    path = folder / "bench_stamp.json"
    return path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(stamp))


# --------------------------------------------------------------------------- data, CLIP, LM
def build_data(cfg: BenchConfig, work: Path) -> dict:
    from prefixcap.demo.synthetic import SyntheticConfig, write_dataset

    specs = {"world": SyntheticConfig(num_train=cfg.num_world, num_test=10, colours=ALL_COLOURS, seed=11),
             "seen": SyntheticConfig(num_train=cfg.num_seen_train, num_test=cfg.num_test, colours=SEEN, seed=12),
             "unseen": SyntheticConfig(num_train=cfg.num_unseen_text, num_test=cfg.num_test, colours=UNSEEN, seed=13)}
    out = {name: write_dataset(work / "data" / name, spec, progress=False) for name, spec in specs.items()}
    print("data: " + ", ".join(f"{n} {d.counts['train']}+{d.counts['test']}" for n, d in out.items()), flush=True)
    return out


def train_clip(cfg: BenchConfig, world, work: Path) -> Path:
    """The tiny CLIP on all (image, caption) pairs of the world set; positives grouped by content."""
    from prefixcap.demo.clip_pretrain import ClipPretrainConfig, pretrain_clip
    from prefixcap.demo.synthetic import read_shards, sample_attributes

    out = work / "clip"
    clip_cfg = ClipPretrainConfig(max_steps=cfg.clip_steps, seed=0, num_threads=cfg.threads)
    stamp = {"data": world.config.to_json(), "clip": asdict(clip_cfg)}
    if _stamp_matches(out, stamp):
        print(f"reusing the tiny CLIP in {out}")
        return out
    samples = list(read_shards(world.shard_paths("train")))
    groups = [tuple(sample_attributes(s.meta)) for s in samples]
    result = pretrain_clip([s.image for s in samples], [s.caption for s in samples], out, clip_cfg,
                           groups=groups, progress=False)
    print(f"tiny CLIP: {result.steps} steps in {result.seconds:.0f} s, loss {result.first_loss:.2f} -> "
          f"{result.final_loss:.2f}", flush=True)
    (out / "bench_stamp.json").write_text(json.dumps(stamp))
    return out


def lm_documents(groups: list[list[str]], seed: int = 0) -> list[str]:
    """Half single captions, half 2-4 wordings of one image joined by '. ' (ordinary repetition in text)."""
    rng = random.Random(seed)
    docs = []
    for wordings in groups:
        if rng.random() < 0.5:
            docs.append(rng.choice(wordings))
        else:
            docs.append(". ".join(rng.sample(wordings, rng.randint(2, min(4, len(wordings))))))
    return docs


def build_lm(cfg: BenchConfig, world, work: Path) -> Path:
    from bench.bench_patch_tokens import pretrain_lm
    from prefixcap.demo.synthetic import read_shards
    from prefixcap.demo.tiny_models import build_tiny_gpt2, default_corpus
    from prefixcap.retrieval.prompt import format_prompt

    out = work / "lm"
    stamp = {"data": world.config.to_json(), "width": cfg.lm_width, "layers": cfg.lm_layers,
             "steps": cfg.lm_pretrain_steps, "docs": "v1"}
    if _stamp_matches(out, stamp):
        print(f"reusing the tiny GPT-2 in {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    groups = [s.meta["captions"] for s in read_shards(world.shard_paths("train"))]
    docs = lm_documents(groups)
    # The tokenizer knows every word, the prompt's own words included (as GPT-2's knows English).
    build_tiny_gpt2(out, corpus=default_corpus() + [c for g in groups for c in g] + [format_prompt(["a"])],
                    n_embd=cfg.lm_width, n_layer=cfg.lm_layers, n_head=2, n_positions=256)
    start = time.perf_counter()
    loss = pretrain_lm(out, docs, cfg.lm_pretrain_steps)
    print(f"tiny GPT-2 pretrained on {len(docs)} documents: {cfg.lm_pretrain_steps} steps in "
          f"{time.perf_counter() - start:.0f} s, final loss {loss:.3f}", flush=True)
    (out / "bench_stamp.json").write_text(json.dumps(stamp))
    return out


def preprocess(ds, split: str, clip: Path, lm: Path, out: Path) -> Path:
    _run_cli("preprocess", [
        "--input_dataset", *ds.shard_paths(split), "--input_format", "webdataset", "--output_folder", str(out),
        "--wds_image_key", ds.config.image_format, "--wds_caption_key", "txt", "--clip_model", str(clip),
        "--tokenizer_model_type", "gpt2", "--tokenizer_model_variant", str(lm), "--max_token_length", "48",
        "--batch_size", "256", "--num_prepro_workers", "1", "--device", "cpu", "--no_progress", "--overwrite"])
    return out


def build_datastores(data: dict, clip: Path, work: Path) -> tuple[Path, Path, dict]:
    """(training datastore, training + unseen-colour captions, build timings)."""
    from prefixcap.demo.synthetic import read_shards

    train_ds, swapped = work / "ds_train", work / "ds_swapped"
    for d in (train_ds, swapped):
        shutil.rmtree(d, ignore_errors=True)
    timings = {}
    start = time.perf_counter()
    _run_cli("datastore", ["build", "--input_dataset", *data["seen"].shard_paths("train"), "--input_format",
                           "webdataset", "--wds_image_key", "jpg", "--wds_caption_in_metadata", "--wds_caption_key",
                           "captions", "--clip_model", str(clip), "--output_dir", str(train_ds), "--no_progress"])
    timings["train_datastore_s"] = round(time.perf_counter() - start, 2)
    text = work / "unseen_captions.txt"  # text only: the images of these captions are never used
    text.write_text("\n".join(c for s in read_shards(data["unseen"].shard_paths("train")) for c in s.meta["captions"]))
    shutil.copytree(train_ds, swapped)
    start = time.perf_counter()
    _run_cli("datastore", ["build", "--input_dataset", str(text), "--input_format", "text", "--append",
                           "--clip_model", str(clip), "--output_dir", str(swapped), "--no_progress"])
    timings["append_s"] = round(time.perf_counter() - start, 2)
    return train_ds, swapped, timings


# --------------------------------------------------------------------------- training and scoring
def train_one(cfg: BenchConfig, data: Path, out: Path, lm_mode: str, seed: int,
              datastore: Path | None) -> tuple[Path, float]:
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--data_dir", str(data), "--output_dir", str(out), "--prefix_length", str(cfg.prefix_length),
            "--epochs", str(cfg.epochs), "--batch_size", str(cfg.batch_size), "--lr", str(cfg.lr),
            "--warmup_steps", str(cfg.warmup_steps), "--seed", str(seed), "--save_every_epochs", "0",
            "--save_every_steps", "1000000", "--num_workers", "0", "--val_fraction", "0",
            "--threads", str(cfg.threads), "--gpu_devices", "cpu"]
    argv += {"frozen": ["--only_prefix"], "lora": ["--lora_rank", "8"], "fine-tuned": []}[lm_mode]
    if datastore is not None:
        argv += ["--datastore", str(datastore), "--retrieval_k", str(cfg.retrieval_k)]
    start = time.perf_counter()
    _run_cli("train", argv)
    return out / "demo_model_final.ckpt", time.perf_counter() - start


def test_set(ds, pre: Path) -> dict:
    """Keys, stored embeddings (N, C), true attributes and references of a preprocessed test split."""
    import numpy as np

    from prefixcap import load_preprocessed
    from prefixcap.demo.synthetic import read_shards, sample_attributes

    meta = {s.key: s.meta for s in read_shards(ds.shard_paths("test"))}
    data = load_preprocessed(pre)
    keys, emb = zip(*(data.image(i) for i in range(data.num_images)))
    return {"keys": list(keys), "embeddings": np.stack(emb), "truth": [sample_attributes(meta[k]) for k in keys],
            "refs": {k: meta[k]["captions"] for k in keys}}


def score(model_dir: Path, test: dict, datastore: Path | None) -> dict:
    """Greedy captions from the stored test embeddings -> attribute accuracy, CIDEr-D, retrieval time."""
    from prefixcap.caption.captioner import Captioner
    from prefixcap.demo.shapes import attribute_accuracy, caption_attributes
    from prefixcap.evaluate.metrics import coco_scores

    cap = Captioner.from_pretrained(model_dir, datastore=str(datastore) if datastore else None)
    retrieval_ms = None
    if cap.retriever is not None:
        start = time.perf_counter()
        cap.retriever.prompts(test["embeddings"])
        retrieval_ms = 1000 * (time.perf_counter() - start) / len(test["keys"])
    captions = cap.caption_embeddings(test["embeddings"], batch_size=100)
    acc = attribute_accuracy(captions, test["truth"])
    for colour in sorted({t.colour for t in test["truth"]}):  # which colours a model names right, one by one
        pairs = [(c, t) for c, t in zip(captions, test["truth"]) if t.colour == colour]
        acc[f"colour:{colour}"] = sum(caption_attributes(c)[0] == colour for c, _ in pairs) / len(pairs)
    cider = coco_scores(dict(zip(test["keys"], captions)), {k: test["refs"][k] for k in test["keys"]},
                        metrics=["cider"], tokenizer="simple").corpus["CIDEr"]
    return {**acc, "cider": float(cider), "retrieval_ms": retrieval_ms,
            "examples": [{"key": k, "predicted": c, "reference": test["refs"][k][0]}
                         for k, c in list(zip(test["keys"], captions))[:3]]}


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run_all(cfg: BenchConfig, pre_train: Path, tests: dict, stores: dict, work: Path) -> list[dict]:
    runs = []
    for lm_mode, seed in ((m, s) for m in cfg.lm_modes for s in cfg.seeds):
        for model, store in (("no retrieval", None), ("retrieval", stores["training datastore"])):
            out = work / "models" / f"{model.replace(' ', '_')}_{lm_mode}_{seed}"
            model_dir, seconds = train_one(cfg, pre_train, out, lm_mode, seed, store)
            mb = _folder_mb(model_dir)
            inference = {"none": None} if store is None else {k: v for k, v in stores.items()}
            for ds_name, ds_path in inference.items():
                for test_name, test in tests.items():
                    r = score(model_dir, test, ds_path)
                    runs.append({"lm_mode": lm_mode, "model": model, "datastore": ds_name, "test": test_name, "seed": seed,
                                 "train_seconds": round(seconds, 1), "artifact_mb": round(mb, 3), **r})
                    print(f"[{lm_mode} / {model} / {ds_name} / {test_name} / seed {seed}] colour {r['colour']:.3f} all "
                          f"{r['all']:.3f} CIDEr-D {r['cider']:.3f}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_retrieval", description=__doc__.splitlines()[0])
    add_seeded_args(p, "reduced sizes and 2 seeds: a smoke run (no docs written)")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs of every captioner (a check run)")
    p.add_argument("--lm_modes", nargs="+", choices=("frozen", "lora", "fine-tuned"), default=None)
    args = p.parse_args(argv)
    cfg = BenchConfig(threads=args.threads)
    cfg = seeded_config(cfg, args, QUICK, WORK / "retrieval_quick")
    if args.lm_modes:
        cfg = replace(cfg, lm_modes=tuple(args.lm_modes))
    if args.epochs or args.seeds or args.workdir or args.lm_modes:  # not the documented configuration
        cfg = replace(cfg, epochs=args.epochs or cfg.epochs, write_docs=False, results_name=cfg.results_name + "_check")
    return run_bench(cfg)


def run_bench(cfg: BenchConfig) -> int:
    from transformers.utils import logging as hf_logging

    from bench.retrieval_report import markdown, summarize, write_docs

    hf_logging.disable_progress_bar()
    set_threads(cfg.threads)
    info = machine_info()
    info["load_average_start"] = load_average()
    print_header("retrieval-augmented captioning (unseen colours)", asdict(cfg), info)
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    start, stages = time.perf_counter(), {}
    t = time.perf_counter()
    data = build_data(cfg, work)
    clip = train_clip(cfg, data["world"], work)
    lm = build_lm(cfg, data["world"], work)
    stages["data + CLIP + LM"] = time.perf_counter() - t
    t = time.perf_counter()
    pre_train = preprocess(data["seen"], "train", clip, lm, work / "pre_seen_train")
    tests = {"seen colours": test_set(data["seen"], preprocess(data["seen"], "test", clip, lm, work / "pre_seen_test")),
             "unseen colours": test_set(data["unseen"],
                                        preprocess(data["unseen"], "test", clip, lm, work / "pre_unseen_test"))}
    train_ds, swapped, ds_timings = build_datastores(data, clip, work)
    stores = {"training datastore": train_ds, "+ unseen-colour captions": swapped}
    stages["preprocess + datastores"] = time.perf_counter() - t
    t = time.perf_counter()
    runs = run_all(cfg, pre_train, tests, stores, work)
    stages["train + score"] = time.perf_counter() - t
    total = time.perf_counter() - start
    rows = summarize(runs)
    sizes = {name: {"captions": json.loads((path / "manifest.json").read_text())["count"],
                    "mb": round(_folder_mb(path), 2)} for name, path in stores.items()}
    figures = {"rows": rows, "runs": runs, "stages_s": {k: round(v, 1) for k, v in stages.items()},
               "total_s": round(total, 1), "datastores": sizes, "datastore_build": ds_timings}
    write_result(cfg.results_name, asdict(cfg), info, figures)
    table = markdown(rows, cfg, info, total, sizes, ds_timings)
    (REPO / "bench" / "results" / f"{cfg.results_name}.md").write_text(table)
    print(table)
    if cfg.write_docs:
        write_docs(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
