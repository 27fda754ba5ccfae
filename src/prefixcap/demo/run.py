"""The offline demo as a library: synthetic shapes -> tiny CLIP + tiny GPT-2 -> the real stages -> a report.

Every stage runs through its public command (`prefixcap preprocess/train/caption/evaluate`), with
the argv a user would type, printed before it runs. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path



@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults meet the targets (< 5 min on 2 cores, >= 90 % all-correct)."""

    workdir: str = "demo_output"
    seed: int = 0
    num_train: int = 4000
    num_test: int = 200
    # The tiny CLIP trains for a fixed number of steps (reproducible accuracy; ~12 steps/s on 2
    # cores). clip_seconds bounds it only when clip_max_steps is None (a time-bounded run).
    clip_seconds: float = 150.0
    clip_max_steps: int | None = 1200
    lm_width: int = 64
    lm_layers: int = 2
    lm_heads: int = 2
    prefix_length: int = 4
    mapping_type: str = "mlp"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    # One torch thread: on a free 2-core machine two threads gain only ~10 %, but beside any other
    # busy process they make the tiny models 4-13x slower (measured: tiny CLIP 91 s -> 376 s).
    threads: int = 1
    sheet_images: int = 24
    eval_metrics: str | None = None  # evaluate's --metrics (None: all but SPICE; METEOR costs ~10 s)
    stage_seconds: dict[str, float] = field(default_factory=dict)


# `--quick`: half the data, fewer CLIP steps (~100 s on 2 cores; measured 83 % all-three correct).
QUICK = {"num_train": 2000, "num_test": 60, "clip_max_steps": 500, "epochs": 12, "batch_size": 32,
         "sheet_images": 12}


@dataclass
class DemoResult:
    """The figures a run printed (also written to report.json)."""

    accuracy: dict[str, float]
    metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    baseline_caption: str
    stage_seconds: dict[str, float]
    total_seconds: float
    examples: list[dict[str, str]]
    load_average: dict[str, list[float]] = field(default_factory=dict)  # 1/5/15-min, at start and end


@contextmanager
def _stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 1)
    print(f"--- {name}: {seconds[name]:.1f} s", flush=True)


def _run(command: str, argv: list[str]) -> None:
    """Run a stage through the one CLI entry point, exactly as `prefixcap COMMAND ARGV` would."""
    from prefixcap.cli import main

    print("$ prefixcap " + command + " " + " ".join(_quote(a) for a in argv), flush=True)
    code = main([command, *argv])
    if code:
        raise RuntimeError(f"`prefixcap {command}` failed with exit code {code}")


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in " {}*") else arg


def _clip_stamp(cfg: DemoConfig, data_config: dict) -> dict:
    budget = {"clip_max_steps": cfg.clip_max_steps} if cfg.clip_max_steps else {"clip_seconds": cfg.clip_seconds}
    # The thread count changes float summation order, hence the trained weights.
    stamp = {"data": data_config, **budget, "seed": cfg.seed, "threads": cfg.threads}
    return json.loads(json.dumps(stamp))  # as read back from disk (tuples become lists)


def _train_tiny_clip(cfg: DemoConfig, dataset, clip_dir: Path) -> str:
    """Pretrain (or reuse) the tiny CLIP stand-in on the training pairs."""
    from prefixcap.demo.clip_pretrain import ClipPretrainConfig, pretrain_clip
    from prefixcap.demo.synthetic import read_shards, sample_attributes

    stamp_path = clip_dir / "demo_stamp.json"
    stamp = _clip_stamp(cfg, dataset.config.to_json())
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        print(f"reusing the tiny CLIP in {clip_dir} (same data and budget)")
        return "reused"
    samples = list(read_shards(dataset.shard_paths("train")))
    groups = [sample_attributes(s.meta) for s in samples]
    result = pretrain_clip(
        [s.image for s in samples], [s.caption for s in samples], clip_dir,
        ClipPretrainConfig(time_budget_s=cfg.clip_seconds, max_steps=cfg.clip_max_steps, seed=cfg.seed,
                           num_threads=cfg.threads),
        groups=groups,
    )
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"tiny CLIP: {result.steps} steps in {result.seconds:.0f} s, loss {result.first_loss:.2f} -> "
          f"{result.final_loss:.2f}")
    return "trained"


def _export_test_split(dataset, folder: Path) -> list[dict]:
    """Write held-out images as files plus their references; returns one row per image."""
    from prefixcap.demo.synthetic import read_shards, sample_attributes

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rows = []
    for s in read_shards(dataset.shard_paths("test")):
        path = folder / f"{s.key}.png"
        s.image.save(path)
        refs = s.meta.get("captions") or [s.caption]
        rows.append({"key": s.key, "image": str(path.resolve()), "captions": refs,
                     "attributes": list(sample_attributes(s.meta).triple)})
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _contact_sheet(rows: list[dict], predictions: dict[str, str], out: Path, count: int) -> None:
    """A grid of held-out images, each with its predicted caption (green: all attributes right)."""
    from PIL import Image, ImageDraw

    from prefixcap.demo.shapes import attributes_correct

    cell_w, img_h, text_h, cols = 200, 128, 44, 6
    shown = rows[:count]
    n_rows = (len(shown) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, n_rows * (img_h + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(shown):
        x, y = (i % cols) * cell_w, (i // cols) * (img_h + text_h)
        img = Image.open(row["image"]).convert("RGB").resize((img_h, img_h), Image.NEAREST)
        sheet.paste(img, (x + (cell_w - img_h) // 2, y))
        caption = predictions.get(row["key"], "")
        ok = attributes_correct(caption, row["attributes"])
        colour = (0, 120, 0) if ok else (190, 0, 0)
        words, lines, line = caption.split(), [], ""
        for w in words:  # wrap at ~32 characters
            if len(line) + len(w) + 1 > 32:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for j, text in enumerate(lines[:3]):
            draw.text((x + 4, y + img_h + 2 + 13 * j), text, fill=colour)
    sheet.save(out)


def _write_report(cfg: DemoConfig, result: DemoResult, work: Path) -> None:
    (work / "report.json").write_text(json.dumps({"config": asdict(cfg), "result": asdict(result)}, indent=2) + "\n")
    acc, m, b = result.accuracy, result.metrics, result.baseline_metrics
    lines = [
        "# prefixcap offline demo report", "",
        (f"Held-out images: {cfg.num_test}; training images: {cfg.num_train}; total time "
         f"{result.total_seconds:.0f} s on this machine ({os.cpu_count()} CPU cores, {cfg.threads} torch "
         f"thread(s); load average at start {_fmt_load(result.load_average.get('start'))}, at end "
         f"{_fmt_load(result.load_average.get('end'))})."), "",
        "| held-out captions with ... correct | share |", "|---|---|",
        *(f"| {k} | {v:.1%} |" for k, v in acc.items()), "",
        "| metric | model | most-frequent-caption baseline |", "|---|---|---|",
        *(f"| {k} | {m[k]:.3f} | {b.get(k, float('nan')):.3f} |" for k in m), "",
        f"Baseline caption: \"{result.baseline_caption}\"", "",
        "| stage | seconds |", "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in result.stage_seconds.items()), "",
        "| image | predicted | a reference |", "|---|---|---|",
        *(f"| {e['key']} | {e['predicted']} | {e['reference']} |" for e in result.examples), "",
        "![contact sheet](contact_sheet.png)", "",
    ]
    (work / "report.md").write_text("\n".join(lines))


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the whole pipeline in cfg.workdir and return the figures."""
    import torch
    from transformers.utils import logging as hf_logging

    from prefixcap.demo.shapes import attribute_accuracy

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown the demo's own output
    torch.set_num_threads(cfg.threads)
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    load_start = _load_average()
    print(f"{os.cpu_count()} CPU cores, {cfg.threads} torch thread(s), load average {_fmt_load(load_start)}")
    t0 = time.perf_counter()

    dataset = _make_data(cfg, work, seconds)
    with _stage("2. tiny CLIP stand-in (contrastive pretraining)", seconds):
        _train_tiny_clip(cfg, dataset, work / "clip")
    # Everything below depends on the data and encoder: rebuilt on every run, so a rerun never
    # mixes artifacts of two configurations.
    for name in ("lm", "preprocessed", "models", "eval", "eval_baseline", "test_images"):
        shutil.rmtree(work / name, ignore_errors=True)
    train_captions = _build_lm(cfg, dataset, work, seconds)
    _preprocess(cfg, dataset, work, seconds)
    model_dir = _train(cfg, work, seconds)
    rows, predicted = _caption_test_split(dataset, model_dir, work, seconds)
    metrics, baseline, baseline_caption = _evaluate(cfg, rows, train_captions, work, seconds)

    accuracy = attribute_accuracy([predicted.get(r["key"], "") for r in rows], [r["attributes"] for r in rows])
    _contact_sheet(rows, predicted, work / "contact_sheet.png", cfg.sheet_images)
    examples = [{"key": r["key"], "predicted": predicted.get(r["key"], ""), "reference": r["captions"][0]}
                for r in rows[:8]]
    result = DemoResult(accuracy, metrics, baseline, baseline_caption, seconds,
                        round(time.perf_counter() - t0, 1), examples,
                        {"start": load_start, "end": _load_average()})
    cfg.stage_seconds = seconds
    _write_report(cfg, result, work)
    _print_summary(result, work)
    return result


def _make_data(cfg: DemoConfig, work: Path, seconds: dict[str, float]):
    from prefixcap.demo.synthetic import SyntheticConfig, write_dataset

    with _stage("1. synthetic dataset (webdataset shards)", seconds):
        data_cfg = SyntheticConfig(num_train=cfg.num_train, num_test=cfg.num_test, seed=cfg.seed)
        dataset = write_dataset(work / "data", data_cfg, progress=False)
        print(f"{'reused' if dataset.reused else 'wrote'} {dataset.counts['train']} train and "
              f"{dataset.counts['test']} held-out samples in {work / 'data'}")
    return dataset


def _build_lm(cfg: DemoConfig, dataset, work: Path, seconds: dict[str, float]) -> list[str]:
    """The tiny GPT-2 stand-in; returns the training captions (its tokenizer's corpus)."""
    from prefixcap.demo.synthetic import read_shards
    from prefixcap.demo.tiny_models import build_tiny_gpt2, default_corpus

    with _stage("3. tiny GPT-2 stand-in (tokenizer trained on the captions)", seconds):
        train_captions = [s.caption for s in read_shards(dataset.shard_paths("train"))]
        build_tiny_gpt2(work / "lm", corpus=default_corpus() + train_captions, n_embd=cfg.lm_width,
                        n_layer=cfg.lm_layers, n_head=cfg.lm_heads, seed=cfg.seed)
    return train_captions


def _preprocess(cfg: DemoConfig, dataset, work: Path, seconds: dict[str, float]) -> None:
    with _stage("4. preprocess", seconds):
        _run("preprocess", [
            "--input_dataset", *dataset.shard_paths("train"), "--input_format", "webdataset",
            "--output_folder", str(work / "preprocessed"), "--wds_image_key", "jpg", "--wds_caption_key", "txt",
            "--clip_model", str(work / "clip"), "--tokenizer_model_type", "gpt2",
            "--tokenizer_model_variant", str(work / "lm"), "--max_token_length", "32",
            "--prefix_length", str(cfg.prefix_length), "--batch_size", "256",
            "--num_prepro_workers", str(min(2, os.cpu_count() or 1)), "--device", "cpu", "--no_progress",
        ])


def _train(cfg: DemoConfig, work: Path, seconds: dict[str, float]) -> Path:
    with _stage("5. train (mapper + fine-tuned LM)", seconds):
        _run("train", [
            "--data_dir", str(work / "preprocessed"), "--output_dir", str(work / "models"),
            "--output_filename_prefix", "demo_model", "--epochs", str(cfg.epochs), "--save_every_epochs", "0",
            "--save_every_steps", "1000000", "--prefix_length", str(cfg.prefix_length),
            "--mapping_type", cfg.mapping_type, "--batch_size", str(cfg.batch_size), "--lr", str(cfg.lr),
            "--warmup_steps", str(cfg.warmup_steps), "--seed", str(cfg.seed), "--num_workers", "0",
            "--val_fraction", "0",
        ])
    return work / "models" / "demo_model_final.ckpt"


def _caption_test_split(dataset, model_dir: Path, work: Path, seconds: dict[str, float]
                        ) -> tuple[list[dict], dict[str, str]]:
    with _stage("6. caption the held-out images", seconds):
        rows = _export_test_split(dataset, work / "test_images")
        predictions_path = work / "predictions.jsonl"
        _run("caption", [
            "--model", str(model_dir), str(work / "test_images"), "--output", str(predictions_path),
            "--batch_size", "100", "--device", "cpu", "--no_progress",
        ])
        predicted = {Path(r["key"]).stem: r.get("caption", "") for r in _read_jsonl(predictions_path)}
    return rows, predicted


def _evaluate(cfg: DemoConfig, rows: list[dict], train_captions: list[str], work: Path,
              seconds: dict[str, float]) -> tuple[dict[str, float], dict[str, float], str]:
    """Score the model's captions and a most-frequent-caption baseline against the same references."""
    with _stage("7. evaluate (model and most-frequent-caption baseline)", seconds):
        refs_path = work / "references.jsonl"
        refs_path.write_text("".join(json.dumps({"key": r["key"], "image": r["image"], "captions": r["captions"]})
                                     + "\n" for r in rows))
        baseline_caption = Counter(train_captions).most_common(1)[0][0]
        baseline_path = work / "baseline_predictions.jsonl"
        baseline_path.write_text("".join(json.dumps({"key": r["key"], "caption": baseline_caption}) + "\n"
                                         for r in rows))
        metric_flags = ["--metrics", cfg.eval_metrics] if cfg.eval_metrics else []
        for predictions, out in ((work / "predictions.jsonl", "eval"), (baseline_path, "eval_baseline")):
            _run("evaluate", [
                "--predictions", str(predictions), "--references", str(refs_path),
                "--images", str(work / "test_images"), "--clip_model", str(work / "clip"),
                "--output_dir", str(work / out), "--no_spice", *metric_flags,
            ])
    return _headline_metrics(work / "eval"), _headline_metrics(work / "eval_baseline"), baseline_caption


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def _fmt_load(load: list[float] | None) -> str:
    return " / ".join(f"{x:.2f}" for x in load) if load else "n/a"


def _headline_metrics(folder: Path) -> dict[str, float]:
    """The figures the demo prints, read from the evaluate stage's metrics.json."""
    data = json.loads((folder / "metrics.json").read_text())
    metrics = data["metrics"]
    keep = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "CLIPScore", "RefCLIPScore")
    return {name: float(metrics[name]) for name in keep if isinstance(metrics.get(name), (int, float))}


def _print_summary(result: DemoResult, work: Path) -> None:
    print("\n=== held-out examples ===")
    for e in result.examples:
        print(f"{e['key']:<16} predicted: {e['predicted']:<45} reference: {e['reference']}")
    print("\n=== held-out captions with the attribute right ===")
    for k, v in result.accuracy.items():
        print(f"{k:<10} {v:6.1%}")
    print("\n=== metrics: model vs a baseline that always says the most frequent training caption ===")
    for k, v in result.metrics.items():
        print(f"{k:<14} model {v:7.3f}   baseline {result.baseline_metrics.get(k, float('nan')):7.3f}")
    print(f"(baseline caption: \"{result.baseline_caption}\")")
    print("\n=== time per stage ===")
    for k, v in result.stage_seconds.items():
        print(f"{v:6.1f} s  {k}")
    print(f"{result.total_seconds:6.1f} s  total (load average at end {_fmt_load(result.load_average.get('end'))})")
    print(f"\nreport: {work / 'report.md'}  contact sheet: {work / 'contact_sheet.png'}")
