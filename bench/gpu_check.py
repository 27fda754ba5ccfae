"""GPU check (issue 25): preprocess images/s, re-caption captions/s and frozen-GPT-2 training samples/s on one GPU.

One prepared run of about 8 minutes on a machine with a CUDA GPU and no network. Models are built
locally with random weights (CLIP ViT-B/32, GPT-2 small: their speed does not depend on the weight
values) and the data is synthetic (640x480 JPEG webdataset shards, five captions per image; a
preprocessed dataset with COCO-like caption lengths). Every figure goes through prefixcap's own
entries with the flags a user would give:

  preprocess  `prefixcap preprocess` (preprocess.cli.parse_config + run_preprocess) over the shards on the
              GPU, a few --batch_size / --num_prepro_workers / --jpeg_draft settings; the best images/s
              (goal >= 5,000 on one H100). The encoder alone on device tensors is reported for context.
  caption     `prefixcap caption --output_dir` (caption.cli.job_from_args + run_caption_job), webdataset
              in and out with --copy_members, ViT-B/32 + MLP K=10 + GPT-2 small, greedy, 20 new tokens,
              --dtype bfloat16, at a few batch sizes; the best captions/s (goal >= 2,000). Generation
              alone on embeddings at the best batch is reported for context.
  train       `prefixcap train`'s run (train.setup.build_run + train.loop.TrainingLoop) with only the
              mapper trained (--only_prefix), --mixed_precision bf16; samples/s over a fixed number of
              optimizer steps after warm-up, at a few batch sizes.

Each phase runs in its own process under a time budget (a phase stops trying settings when the next
would not fit, and is killed past its budget plus a margin); its figures so far are kept either way.
Budgets shrink when earlier steps ran long, so that the whole run ends by a deadline (450 s on a GPU).
Results: gpu_check.json and gpu_check.md (gpu_check_dry_run.* with --dry-run) in the folder given
as argument, by default $OUT when set, else bench/results/. `--dry-run` (or GPU_CHECK_DRY_RUN=1) runs
every phase on the CPU with tiny models and a handful of images: it proves the plumbing, not speed.
Run it through bench/gpu_check.sh (docs/benchmarks.md, "GPU check").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, WORK, load_average, machine_info, print_header

PROG = "gpu_check"
PHASES = ("preprocess", "caption", "train")
GOALS = {"preprocess_images_per_s": 5000.0, "recaption_captions_per_s": 2000.0}
# import name -> what pip installs; everything the three phases import (checked before anything runs)
NEEDED = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate",
          "safetensors": "safetensors", "tokenizers": "tokenizers", "huggingface_hub": "huggingface_hub",
          "pyarrow": "pyarrow", "PIL": "pillow", "numpy": "numpy", "tqdm": "tqdm",
          "webdataset": "webdataset", "braceexpand": "braceexpand", "yaml": "pyyaml"}
WHEELS = ".gpu_wheels"  # git-ignored; filled by `bench/gpu_check.sh --fetch-wheels`
GRACE_S = 30  # a phase is killed this long after its budget
MIN_PHASE_S = 30  # no phase gets less, whatever the overall deadline says


@dataclass(frozen=True)
class Sizes:
    """What one run does: the data, the settings tried per phase and each phase's budget in seconds."""

    dry_run: bool
    images: int  # preprocess input: JPEGs in webdataset shards (5 captions each)
    caption_images: int  # re-caption input
    unique_jpegs: int  # distinct synthetic JPEGs the shards cycle through (same size and decode cost)
    jpeg_size: tuple[int, int]
    images_per_tar: int
    preprocess_runs: tuple[tuple[int, int, bool], ...]  # (--batch_size, --num_prepro_workers, --jpeg_draft)
    encoder_batch: int
    encoder_iters: int
    caption_batches: tuple[int, ...]
    caption_workers: int
    max_new_tokens: int
    train_captions: int
    train_batches: tuple[int, ...]
    train_warmup: int
    train_steps: int
    train_workers: int
    budgets: dict[str, int] = field(default_factory=dict)
    total_s: int = 450  # the whole run's deadline: later phases get less when earlier steps ran long


def gpu_sizes(cores: int) -> Sizes:
    """The real check: sized so that the whole run stays under ~8 minutes on one H100 with 16 cores."""
    w = max(1, cores)
    return Sizes(dry_run=False, images=8192, caption_images=4096, unique_jpegs=512, jpeg_size=(640, 480),
                 images_per_tar=256,
                 preprocess_runs=((512, w, False), (512, w, True), (256, w, False), (1024, w, True),
                                  (512, max(1, w - 2), False)),
                 encoder_batch=512, encoder_iters=30, caption_batches=(256, 512, 128, 1024),
                 caption_workers=w, max_new_tokens=20, train_captions=60_000, train_batches=(256, 40, 1024),
                 train_warmup=5, train_steps=30, train_workers=min(8, w),
                 budgets={"preprocess": 110, "caption": 120, "train": 90}, total_s=450)


def dry_sizes() -> Sizes:
    """--dry-run: every phase on the CPU with tiny models and a handful of images (well under a minute)."""
    return Sizes(dry_run=True, images=12, caption_images=8, unique_jpegs=4, jpeg_size=(64, 48), images_per_tar=4,
                 preprocess_runs=((4, 1, False), (8, 0, True)), encoder_batch=4, encoder_iters=2,
                 caption_batches=(4, 8), caption_workers=2, max_new_tokens=3, train_captions=64,
                 train_batches=(4,), train_warmup=1, train_steps=2, train_workers=0,
                 budgets={"preprocess": 60, "caption": 60, "train": 60}, total_s=300)


# --------------------------------------------------------------------------- checks before anything runs
def missing_packages() -> list[str]:
    """The pip names of needed packages this Python cannot import."""
    return [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]


def needs_gpu_message() -> str | None:
    """None with a CUDA GPU; else the one line saying a GPU is needed."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"{PROG}: a CUDA GPU is needed (torch {torch.__version__}: torch.cuda.is_available() is False); "
            "use --dry-run (or GPU_CHECK_DRY_RUN=1) for the CPU check of the script's plumbing")


# --------------------------------------------------------------------------- synthetic inputs
def _one_jpeg(args: tuple[int, int, int, int]) -> bytes:
    import numpy as np

    from bench.synthetic import synthetic_jpeg

    seed, i, width, height = args
    return synthetic_jpeg(np.random.default_rng([seed, i]), width, height)


def synthetic_jpegs(n: int, size: tuple[int, int], seed: int) -> list[bytes]:
    """n distinct photo-like JPEGs (bench.synthetic), made on every core (~25 ms each at 640x480)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(seed, i, size[0], size[1]) for i in range(n)]
    if n < 64:
        return [_one_jpeg(j) for j in jobs]
    # spawn: this process has already run torch (and maybe CUDA), which forked children must not inherit
    with ProcessPoolExecutor(os.cpu_count(), mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_one_jpeg, jobs, chunksize=8))


def write_jpeg_tars(folder: Path, n: int, sizes: Sizes, seed: int) -> list[str]:
    """bench.synthetic's webdataset shards of n samples cycling through sizes.unique_jpegs distinct JPEGs."""
    from bench.synthetic import write_jpeg_shards

    jpegs = synthetic_jpegs(min(n, sizes.unique_jpegs), sizes.jpeg_size, seed)
    return write_jpeg_shards(folder, n, images_per_tar=sizes.images_per_tar, seed=seed, images=jpegs)


def build_models(sizes: Sizes, workdir: Path) -> tuple[Path, Path]:
    """(CLIP folder, GPT-2 folder): full-size random ViT-B/32 and GPT-2 small, or the tests' tiny ones."""
    if sizes.dry_run:
        from prefixcap.demo.tiny_models import build_tiny_clip, build_tiny_gpt2

        clip, gpt2 = workdir / "models" / "tiny-clip", workdir / "models" / "tiny-gpt2"
        if not (clip / "config.json").is_file():
            build_tiny_clip(clip)
        if not (gpt2 / "config.json").is_file():
            build_tiny_gpt2(gpt2)
        return clip, gpt2
    from bench.builders import build_clip_vit_b32, build_gpt2_small

    return build_clip_vit_b32(), build_gpt2_small()


def model_dims(clip: Path, gpt2: Path) -> tuple[int, int, int]:
    """(CLIP embedding width, LM width, LM vocabulary size) read from the saved configs."""
    clip_cfg = json.loads((clip / "config.json").read_text())
    lm_cfg = json.loads((gpt2 / "config.json").read_text())
    return int(clip_cfg["projection_dim"]), int(lm_cfg["n_embd"]), int(lm_cfg["vocab_size"])


def build_caption_model(clip: Path, gpt2: Path, folder: Path) -> Path:
    """A prefixcap artifact: MLP mapper K=10 (random) in front of the frozen GPT-2 folder."""
    if (folder / "config.json").is_file():
        return folder
    import torch

    from prefixcap.model import CaptionConfig, CaptionModel
    from prefixcap.model.mapping import MappingConfig

    dim, width, _ = model_dims(clip, gpt2)
    torch.manual_seed(0)
    cfg = CaptionConfig(clip_model=str(clip), language_model=str(gpt2), lm_family="causal",
                        mapping=MappingConfig(mapping_type="mlp", prefix_size=dim, lm_dim=width, prefix_length=10),
                        only_prefix=True, max_token_length=67)
    return CaptionModel(cfg).save_pretrained(folder)


def build_train_data(clip: Path, gpt2: Path, folder: Path, num_captions: int) -> Path:
    """A preprocessed dataset of random embeddings and COCO-like token lengths (bench.synthetic)."""
    from bench.bench_train import dataset_manifest
    from bench.synthetic import write_preprocessed

    dim, _, vocab = model_dims(clip, gpt2)
    manifest = {**dataset_manifest(gpt2, clip), "embedding_dim": dim}
    return write_preprocessed(folder, num_captions, manifest, embedding_dim=dim, eos=0, vocab_low=1,
                              vocab_high=min(1000, vocab))


def prepare(sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """Models, shards and datasets every phase reads; the plan the phase processes load (plan.json)."""
    started = time.perf_counter()
    print(f"[prepare] models ({'tiny, CPU' if sizes.dry_run else 'CLIP ViT-B/32 + GPT-2 small, random'}) ...",
          flush=True)
    clip, gpt2 = build_models(sizes, workdir)
    print(f"[prepare] {sizes.images} + {sizes.caption_images} synthetic {sizes.jpeg_size[0]}x{sizes.jpeg_size[1]} "
          "JPEGs in webdataset shards ...", flush=True)
    plan = {
        "sizes": asdict(sizes), "workdir": str(workdir), "device": "cpu" if sizes.dry_run else "cuda",
        "clip": str(clip), "gpt2": str(gpt2),
        "preprocess_tars": write_jpeg_tars(workdir / "data" / "preprocess", sizes.images, sizes, seed=1),
        "caption_tars": write_jpeg_tars(workdir / "data" / "caption", sizes.caption_images, sizes, seed=2),
    }
    print("[prepare] caption model artifact and the training dataset ...", flush=True)
    plan["caption_model"] = str(build_caption_model(clip, gpt2, workdir / "models" / "captioner"))
    plan["train_data"] = str(build_train_data(clip, gpt2, workdir / "data" / f"train_{sizes.train_captions}",
                                              sizes.train_captions))
    plan["prepare_s"] = round(time.perf_counter() - started, 1)
    (workdir / "plan.json").write_text(json.dumps(plan, indent=2))
    print(f"[prepare] done in {plan['prepare_s']} s", flush=True)
    return plan


# --------------------------------------------------------------------------- phases (one process each)
class PhaseLog:
    """A phase's results so far, rewritten after every measurement so a killed phase keeps them."""

    def __init__(self, plan: dict[str, Any], name: str):
        self.path = Path(plan["workdir"]) / f"phase_{name}.json"
        self.budget = plan["budget_s"]
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {"runs": []}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def add_run(self, run: dict[str, Any]) -> None:
        self.data["runs"].append(run)
        self.save()

    def fits(self, last_s: float) -> bool:
        """Whether one more measurement like the last one fits in the budget."""
        return time.perf_counter() - self.started + 1.2 * last_s < self.budget


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encoder_only(plan: dict[str, Any]) -> dict[str, Any]:
    """CLIP encode_pixels on pixels already on the device (the encoder's own ceiling, for context)."""
    import torch

    from prefixcap.model.encoders import load_encoder

    s, device = plan["sizes"], plan["device"]
    encoder = load_encoder(plan["clip"], device=device)
    size = int(json.loads((Path(plan["clip"]) / "config.json").read_text())["vision_config"]["image_size"])
    pixels = torch.randn(s["encoder_batch"], 3, size, size, device=device)  # (B, 3, H, W)
    for _ in range(3):
        encoder.encode_pixels(pixels)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(s["encoder_iters"]):
        encoder.encode_pixels(pixels)
    synchronize(device)
    seconds = time.perf_counter() - start
    out = {"batch_size": s["encoder_batch"], "dtype": str(encoder.dtype).replace("torch.", ""),
           "images_per_s": round(s["encoder_batch"] * s["encoder_iters"] / seconds, 1)}
    del encoder, pixels
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the runs below load their own encoder
    return out


def phase_preprocess(plan: dict[str, Any]) -> None:
    import shutil

    from prefixcap.preprocess.cli import parse_config
    from prefixcap.preprocess.run import run_preprocess

    log = PhaseLog(plan, "preprocess")
    log.data["encoder_only"] = encoder_only(plan)
    log.save()
    print(f"[preprocess] encoder alone: {log.data['encoder_only']['images_per_s']:,.1f} images/s "
          f"(batch {log.data['encoder_only']['batch_size']}, {log.data['encoder_only']['dtype']})", flush=True)
    last = 0.0
    for i, (batch, workers, draft) in enumerate(plan["sizes"]["preprocess_runs"]):
        if i and not log.fits(last):
            print(f"[preprocess] budget: skipping the remaining {len(plan['sizes']['preprocess_runs']) - i} settings")
            break
        out = Path(plan["workdir"]) / "out" / f"preprocess_{i}"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["--input_dataset", *plan["preprocess_tars"], "--input_format", "webdataset",
                "--wds_caption_in_metadata", "--wds_caption_key", "captions", "--output_folder", str(out),
                "--clip_model", plan["clip"], "--tokenizer_model_type", "gpt2",
                "--tokenizer_model_variant", plan["gpt2"], "--batch_size", str(batch),
                "--num_prepro_workers", str(workers), "--device", plan["device"], "--no_progress",
                *(["--jpeg_draft"] if draft else [])]
        start = time.perf_counter()
        summary = run_preprocess(parse_config(argv))
        last = time.perf_counter() - start
        run = {"batch_size": batch, "num_prepro_workers": workers, "jpeg_draft": draft,
               "images": summary.num_images, "captions": summary.num_captions,
               "runner_s": round(summary.seconds, 2), "with_loading_s": round(last, 2),
               "images_per_s": round(summary.num_images / summary.seconds, 1)}
        log.add_run(run)
        print(f"[preprocess] --batch_size {batch} --num_prepro_workers {workers}"
              f"{' --jpeg_draft' if draft else ''}: {run['images_per_s']:,.1f} images/s "
              f"({summary.num_images} images in {summary.seconds:.1f} s)", flush=True)
        shutil.rmtree(out, ignore_errors=True)


def caption_run(plan: dict[str, Any], tars: list[str], batch: int, out: Path):
    """One `prefixcap caption --output_dir` job through the CLI's own parser; its RecaptionSummary."""
    import shutil

    from prefixcap.caption.cli import build_parser, job_from_args
    from prefixcap.caption.job import run_caption_job

    s = plan["sizes"]
    shutil.rmtree(out, ignore_errors=True)
    parser = build_parser()
    argv = [*tars, "--model", plan["caption_model"], "--output_dir", str(out), "--output_format", "webdataset",
            "--copy_members", "--batch_size", str(batch), "--num_workers", str(s["caption_workers"]),
            "--device", plan["device"], "--dtype", "bfloat16", "--max_new_tokens", str(s["max_new_tokens"]),
            "--no_progress"]
    summary = run_caption_job(job_from_args(parser, parser.parse_args(argv)))
    shutil.rmtree(out, ignore_errors=True)
    return summary


def generate_only(plan: dict[str, Any], batch: int) -> dict[str, Any]:
    """Captioner.generate + decode on random embeddings at `batch` (no decoding or encoding of images)."""
    import torch

    from prefixcap.caption.captioner import Captioner
    from prefixcap.generation import GenerationSettings

    s, device = plan["sizes"], plan["device"]
    cap = Captioner.from_pretrained(plan["caption_model"], device=device, dtype=torch.bfloat16)
    settings = GenerationSettings(max_new_tokens=s["max_new_tokens"])
    dim = cap.config.mapping.prefix_size
    emb = torch.randn(max(batch, s["caption_images"]), dim)  # (N, C)
    for _ in range(3):  # warm-up: the first calls of a new Captioner are several times slower
        cap.decode(cap.generate(emb[:batch], settings).tokens)
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, emb.shape[0], batch):
        cap.decode(cap.generate(emb[i:i + batch], settings).tokens)
    synchronize(device)
    seconds = time.perf_counter() - start
    cap.close()
    return {"batch_size": batch, "captions": int(emb.shape[0]), "captions_per_s": round(emb.shape[0] / seconds, 1)}


def phase_caption(plan: dict[str, Any]) -> None:
    log = PhaseLog(plan, "caption")
    out = Path(plan["workdir"]) / "out" / "caption"
    print("[caption] warm-up job on one shard ...", flush=True)
    start = time.perf_counter()
    caption_run(plan, plan["caption_tars"][:1], plan["sizes"]["caption_batches"][0], out)
    last = time.perf_counter() - start
    for i, batch in enumerate(plan["sizes"]["caption_batches"]):
        if i and not log.fits(last):
            print(f"[caption] budget: skipping batch sizes {plan['sizes']['caption_batches'][i:]}", flush=True)
            break
        start = time.perf_counter()
        summary = caption_run(plan, plan["caption_tars"], batch, out)
        last = time.perf_counter() - start
        errors = sum(summary.errors.values())
        run = {"batch_size": batch, "captioned": summary.captioned, "errors": errors,
               "seconds": round(summary.seconds, 2), "with_loading_s": round(last, 2),
               "captions_per_s": round(summary.captioned / summary.seconds, 1)}
        log.add_run(run)
        print(f"[caption] --batch_size {batch}: {run['captions_per_s']:,.1f} captions/s ({summary.captioned} "
              f"captioned, {errors} errors, {summary.seconds:.1f} s)", flush=True)
    if log.data["runs"] and log.fits(last / 2):
        best = max(log.data["runs"], key=lambda r: r["captions_per_s"])["batch_size"]
        log.data["generate_only"] = generate_only(plan, best)
        log.save()
        print(f"[caption] generation alone at batch {best}: {log.data['generate_only']['captions_per_s']:,.1f} "
              "captions/s", flush=True)


def train_run(plan: dict[str, Any], batch: int) -> dict[str, Any]:
    """`prefixcap train --only_prefix --mixed_precision bf16`'s run with its optimizer steps timestamped."""
    from prefixcap.devices import select_devices
    from prefixcap.train.config import TrainConfig
    from prefixcap.train.loop import TrainingLoop
    from prefixcap.train.setup import build_run

    s, device = plan["sizes"], plan["device"]
    warmup, steps = s["train_warmup"], s["train_steps"]
    cfg = TrainConfig(data_dir=plan["train_data"], output_dir=str(Path(plan["workdir"]) / "out" / f"train_{batch}"),
                      batch_size=batch, only_prefix=True, epochs=1000, max_steps=warmup + steps,
                      save_every_steps=0, save_every_epochs=0, num_workers=s["train_workers"],
                      gpu_devices="cpu" if device == "cpu" else "0",
                      mixed_precision="no" if device == "cpu" else "bf16", log_every_steps=10**9, warmup_ratio=0.1,
                      overwrite_output_dir=True)
    cpu, _ = select_devices(cfg.gpu_devices)
    loop = TrainingLoop(build_run(cfg, cpu))
    stamps: dict[int, float] = {}  # optimizer step number (1-based) -> when it returned
    inner_step = loop.optimizer.step

    def timed_step(*args, **kwargs):
        out = inner_step(*args, **kwargs)
        n = len(stamps) + 1
        if n in (warmup, warmup + steps):
            synchronize(device)  # the GPU has finished every step before the stamp
        stamps[n] = time.perf_counter()
        return out

    loop.optimizer.step = timed_step
    result = loop.run()
    if warmup + steps not in stamps:
        raise RuntimeError(f"prefixcap train ran {len(stamps)} optimizer steps, expected {warmup + steps}")
    seconds = stamps[warmup + steps] - stamps[warmup]
    return {"batch_size": batch, "warmup_steps": warmup, "timed_steps": steps, "seconds": round(seconds, 3),
            "samples_per_s": round(batch * steps / seconds, 1), "device": result.device,
            "mixed_precision": cfg.mixed_precision, "num_workers": cfg.num_workers}


def phase_train(plan: dict[str, Any]) -> None:
    log = PhaseLog(plan, "train")
    last = 0.0
    for i, batch in enumerate(plan["sizes"]["train_batches"]):
        if i and not log.fits(last):
            print(f"[train] budget: skipping batch sizes {plan['sizes']['train_batches'][i:]}", flush=True)
            break
        start = time.perf_counter()
        run = train_run(plan, batch)
        last = time.perf_counter() - start
        log.add_run(run)
        print(f"[train] --batch_size {batch}: {run['samples_per_s']:,.1f} samples/s ({run['timed_steps']} steps "
              f"after {run['warmup_steps']} warm-up, {run['mixed_precision']})", flush=True)


PHASE_FUNCTIONS = {"preprocess": phase_preprocess, "caption": phase_caption, "train": phase_train}


def run_phase_child(name: str, workdir: Path, budget: float) -> int:
    """The child process of one phase: its errors go into its phase file as one line (and stderr in full)."""
    import traceback

    plan = {**json.loads((workdir / "plan.json").read_text()), "budget_s": budget}
    try:
        PHASE_FUNCTIONS[name](plan)
    except BaseException as err:
        traceback.print_exc()
        path = workdir / f"phase_{name}.json"
        data = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        data["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        path.write_text(json.dumps(data, indent=2))
        return 1
    return 0


def phase_budget(name: str, phases: list[str], sizes: Sizes, elapsed: float) -> int:
    """The phase's own budget, cut so that it and the phases after it (MIN_PHASE_S each) end by the deadline."""
    later = phases[phases.index(name) + 1:]
    left = sizes.total_s - elapsed - GRACE_S - MIN_PHASE_S * len(later)
    return int(max(MIN_PHASE_S, min(sizes.budgets[name], left)))


def run_phase(name: str, plan: dict[str, Any], budget: int) -> dict[str, Any]:
    """Run one phase in its own process group under its budget (+ GRACE_S); its results and status."""
    workdir = Path(plan["workdir"])
    path = workdir / f"phase_{name}.json"
    path.unlink(missing_ok=True)
    print(f"== phase {name} (budget {budget} s) ==", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--_phase", name, "--_budget", str(budget),
                             "--workdir", str(workdir)], cwd=REPO, start_new_session=True)
    try:
        code = proc.wait(timeout=budget + GRACE_S)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"killed after {budget + GRACE_S} s (budget {budget} s)"
    data = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    if data.get("error"):
        status += f": {data['error']}"
    data.update(status=status, budget_s=budget, seconds=round(time.perf_counter() - start, 1))
    print(f"== phase {name}: {status} in {data['seconds']} s ==", flush=True)
    return data


# --------------------------------------------------------------------------- figures and output
def best(runs: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    return max(runs, key=lambda r: r[key]) if runs else None


def figure(value: float | None, unit: str, goal: float | None, dry_run: bool, **settings: Any) -> dict[str, Any]:
    """One reported figure: its value, goal and whether it is met (None where no goal, or in a dry run)."""
    met = None if goal is None or dry_run or value is None else value >= goal
    return {"value": value, "unit": unit, "goal": goal, "met": met, **settings}


def figures_from(phases: dict[str, dict[str, Any]], dry_run: bool) -> dict[str, Any]:
    pre, cap, tr = (phases.get(p, {}) for p in PHASES)
    out: dict[str, Any] = {}
    if pre:
        b = best(pre.get("runs", []), "images_per_s")
        out["preprocess_images_per_s"] = figure(
            b and b["images_per_s"], "images/s", GOALS["preprocess_images_per_s"], dry_run,
            **({k: b[k] for k in ("batch_size", "num_prepro_workers", "jpeg_draft")} if b else {}))
        b = best([r for r in pre.get("runs", []) if not r["jpeg_draft"]], "images_per_s")
        out["preprocess_images_per_s_full_decode"] = figure(
            b and b["images_per_s"], "images/s", None, dry_run,
            **({k: b[k] for k in ("batch_size", "num_prepro_workers")} if b else {}))
        enc = pre.get("encoder_only")
        out["encoder_only_images_per_s"] = figure(enc and enc["images_per_s"], "images/s", None, dry_run,
                                                  **{k: v for k, v in (enc or {}).items() if k != "images_per_s"})
    if cap:
        b = best(cap.get("runs", []), "captions_per_s")
        out["recaption_captions_per_s"] = figure(b and b["captions_per_s"], "captions/s",
                                                 GOALS["recaption_captions_per_s"], dry_run,
                                                 batch_size=b and b["batch_size"])
        gen = cap.get("generate_only")
        out["generate_only_captions_per_s"] = figure(gen and gen["captions_per_s"], "captions/s", None, dry_run,
                                                     batch_size=gen and gen["batch_size"])
    if tr:
        b = best(tr.get("runs", []), "samples_per_s")
        out["train_samples_per_s"] = figure(b and b["samples_per_s"], "samples/s", None, dry_run,
                                            batch_size=b and b["batch_size"])
    return out


LABELS = {
    "preprocess_images_per_s": "Preprocess, `prefixcap preprocess` end to end (best setting)",
    "preprocess_images_per_s_full_decode": "Preprocess, same, without --jpeg_draft (best setting)",
    "encoder_only_images_per_s": "CLIP ViT-B/32 encoder alone on device tensors",
    "recaption_captions_per_s": "Re-caption, `prefixcap caption --output_dir` end to end (best batch)",
    "generate_only_captions_per_s": "Generation alone on embeddings (same batch)",
    "train_samples_per_s": "Train, frozen GPT-2 small, MLP K=10 mapper only (best batch)",
}


def render_markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    mode = "DRY RUN on the CPU with tiny models: plumbing only, the figures say nothing about speed" \
        if payload["settings"]["dry_run"] else f"GPU: {m['gpu']}"
    lines = [f"# GPU check ({payload['time']})", "", f"{mode}; torch {m['versions']['torch']}, transformers "
             f"{m['versions']['transformers']}, CUDA {m.get('cuda')}, {m['cpu_count']} CPU cores ({m['cpu']}).", "",
             "| what | figure | goal | met | setting |", "|---|---|---|---|---|"]
    for key, f in payload["figures"].items():
        value = "-" if f["value"] is None else f"{f['value']:,.1f} {f['unit']}"
        goal = "-" if f["goal"] is None else f"≥ {f['goal']:,.0f}"
        met = {None: "-", True: "met", False: "**not met**"}[f["met"]]
        setting = ", ".join(f"{k} {v}" for k, v in f.items() if k not in ("value", "unit", "goal", "met"))
        lines.append(f"| {LABELS.get(key, key)} | {value} | {goal} | {met} | {setting} |")
    lines += ["", "Phases: " + "; ".join(f"{p} {d['status']} ({d['seconds']} s)"
                                           for p, d in payload["phases"].items()), ""]
    return "\n".join(lines)


def write_outputs(out_dir: Path, payload: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_dry_run" if payload["settings"]["dry_run"] else "gpu_check"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(payload))
    return json_path, md_path


def gpu_details() -> dict[str, Any]:
    import torch

    details: dict[str, Any] = {"cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        details.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_multiprocessors=props.multi_processor_count,
                       bf16_supported=torch.cuda.is_bf16_supported())
    return details


# --------------------------------------------------------------------------- the entry
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default=None,
                   help="where gpu_check.json / .md go (default: $OUT when set, else bench/results/)")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                   help="every phase on the CPU with tiny models (also GPU_CHECK_DRY_RUN=1)")
    p.add_argument("--workdir", default=None, help="models, shards and scratch outputs (default bench/_work/gpu_check"
                   "[_dry_run])")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--_phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_budget", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._phase:
        return run_phase_child(args._phase, Path(args.workdir), args._budget)
    missing = missing_packages()
    if missing:
        print(f"{PROG}: missing Python packages: {', '.join(missing)}; fill {WHEELS}/ with `bench/gpu_check.sh "
              f"--fetch-wheels` on a machine with network and carry it (docs/benchmarks.md, 'GPU check')",
              file=sys.stderr)
        return 2
    if not args.dry_run and (message := needs_gpu_message()):
        print(message, file=sys.stderr)
        return 1
    started = time.perf_counter()
    sizes = dry_sizes() if args.dry_run else gpu_sizes(os.cpu_count() or 1)
    out_dir = Path(args.out_dir or os.environ.get("OUT") or RESULTS)
    workdir = Path(args.workdir or WORK / ("gpu_check_dry_run" if args.dry_run else "gpu_check")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(), **gpu_details()}
    settings = {"dry_run": sizes.dry_run, "phases": args.phases, **{k: v for k, v in asdict(sizes).items()
                                                                      if k != "dry_run"}}
    print_header("gpu_check" + (" (dry run)" if sizes.dry_run else ""), {"phases": args.phases,
                 "budgets_s": sizes.budgets, "deadline_s": sizes.total_s, "out_dir": str(out_dir)}, info)
    plan = prepare(sizes, workdir)
    phases = {}
    for name in args.phases:
        budget = phase_budget(name, args.phases, sizes, time.perf_counter() - started)
        phases[name] = run_phase(name, plan, budget)
    payload = {"benchmark": "gpu_check", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": settings,
               "machine": {**info, "load_average_end": load_average()}, "figures": figures_from(phases, sizes.dry_run),
               "phases": phases, "prepare_s": plan["prepare_s"], "total_s": round(time.perf_counter() - started, 1),
               "notes": NOTES}
    json_path, md_path = write_outputs(out_dir, payload)
    print(render_markdown(payload))
    print(f"wrote {json_path} and {md_path} ({payload['total_s']} s in all)")
    return 0 if all(p["status"] == "ok" for p in phases.values()) else 1


NOTES = [
    "Random weights never emit end-of-text early, so every caption runs the full --max_new_tokens (20).",
    "Preprocess encodes in the encoder's GPU dtype (float16); re-captioning runs the mapper and GPT-2 in bfloat16 "
    "(--dtype bfloat16) with the CLIP encoder in float16; training uses Accelerate's bf16 autocast.",
    "The JPEG shards cycle through a few hundred distinct 640x480 synthetic photos (~100 KB each): same decode cost "
    "as distinct ones.",
]


if __name__ == "__main__":
    sys.exit(main())
