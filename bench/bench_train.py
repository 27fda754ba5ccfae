"""Training throughput: `prefixcap train` vs the original ClipCap training loop, same data, same model.

Both train an MLP mapper (K=10) in front of GPT-2 small (random weights) on one synthetic
preprocessed dataset with a COCO-like caption-length distribution, on the CPU in fp32:
  prefixcap  prefixcap.train.run.train(TrainConfig(...)): frozen LM (no weight gradients), per-batch
             padding with length-grouped batches, LM head only on caption positions, worker processes
  reference  bench.reference.ReferenceTrainer: every caption padded to min(mean + 10 std, max),
             weight gradients computed for the frozen LM, LM head on every position, no workers
Steady-state samples/s (the first steps are warm-up) for frozen LM ("prefix only") and fine-tuning.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import (
    THREADS_HELP,
    WORK,
    machine_info,
    print_header,
    ratio,
    set_threads,
    write_result,
)


def dataset_manifest(gpt2_dir: Path, clip_dir: Path) -> dict:
    """The manifest header the preprocess stage writes, for a dataset tokenized for our GPT-2."""
    from prefixcap.model.language_models import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(str(gpt2_dir))
    return {"clip_model": str(clip_dir), "embedding_dim": 512, "normalized": False, "tokenizer": str(gpt2_dir),
            "lm_family": "causal", "tokenizer_fingerprint": tokenizer_fingerprint(tok), "max_token_length": 128,
            "prefix_length": 10, "input_format": "synthetic", "created_by": "bench.synthetic", "format_version": 1}


def make_dataset(num_captions: int) -> Path:
    from bench.builders import CLIP_DIR, build_gpt2_small
    from bench.synthetic import write_preprocessed

    gpt2 = build_gpt2_small()
    return write_preprocessed(WORK / "data" / f"train_{num_captions}", num_captions,
                              dataset_manifest(gpt2, CLIP_DIR), eos=0, vocab_low=1, vocab_high=1000)


def run_prefixcap(data_dir: Path, batch_size: int, steps: int, warmup: int, only_prefix: bool,
                  num_workers: int) -> dict:
    """prefixcap's own trainer; optimizer steps are timestamped, checkpoint writing is skipped."""
    import torch

    from prefixcap.train.config import TrainConfig
    from prefixcap.train.loop import TrainingLoop
    from prefixcap.train.setup import build_run

    cfg = TrainConfig(data_dir=str(data_dir), output_dir=str(WORK / "out" / "train_bench"),
                      batch_size=batch_size, only_prefix=only_prefix, epochs=1, max_steps=warmup + steps,
                      save_every_steps=0, save_every_epochs=0, num_workers=num_workers, gpu_devices="cpu",
                      log_every_steps=10**9, overwrite_output_dir=True)
    trainer = TrainingLoop(build_run(cfg, cpu=True))
    trainer._save = lambda tag: None  # writing checkpoints is not what is compared here
    stamps: list[float] = []
    tokens_per_step: list[int] = []
    inner_step = trainer.optimizer.step

    def timed_step(*a, **kw):
        out = inner_step(*a, **kw)
        stamps.append(time.perf_counter())
        return out

    trainer.optimizer.step = timed_step
    model = trainer.model
    inner_forward = model.forward

    def counting_forward(emb, tokens, mask):
        tokens_per_step.append(int(tokens.shape[1]))
        return inner_forward(emb, tokens, mask)

    model.forward = counting_forward
    torch.manual_seed(0)
    trainer.run()
    times = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    if len(times) < steps:
        raise RuntimeError(f"prefixcap train ran {len(stamps)} steps, expected {warmup + steps}")
    return {"step_s": times, "samples_per_s": batch_size * len(times) / sum(times),
            "padded_caption_len_mean": sum(tokens_per_step[warmup:]) / max(1, len(tokens_per_step[warmup:])),
            "trainable_params": trainer.built.trainable}


def build_reference(data_dir: Path, only_prefix: bool, seed: int = 42):
    import numpy as np
    import torch

    from bench import reference
    from prefixcap.data.shards import load_preprocessed
    from prefixcap.model.language_models import load_language_model
    from prefixcap.model.mapping import MappingConfig, build_mapper

    data = load_preprocessed(data_dir)
    # The original loaded its whole pickle into memory; so does the reference.
    tokens, embs = [], []
    for i in range(len(data)):
        t, e, _ = data.tokens_and_embedding(i)
        tokens.append(np.array(t))
        embs.append(np.asarray(e, np.float32))
    dataset = reference.PaddedCaptionDataset(tokens, np.stack(embs), prefix_length=10)
    torch.manual_seed(seed)
    lm = load_language_model(data.manifest.tokenizer, "causal")
    mapper = build_mapper(MappingConfig("mlp", prefix_size=512, lm_dim=768, prefix_length=10))
    return reference.ReferenceCaptioner(lm, mapper, 10, only_prefix), dataset


def run_reference(data_dir: Path, batch_size: int, steps: int, warmup: int, only_prefix: bool) -> dict:
    from bench import reference

    model, dataset = build_reference(data_dir, only_prefix)
    trainer = reference.ReferenceTrainer(model, dataset, batch_size=batch_size)
    times = trainer.run(warmup + steps)[warmup:]
    return {"step_s": times, "samples_per_s": batch_size * len(times) / sum(times),
            "padded_caption_len": dataset.max_len}


def check_same_loss(data_dir: Path) -> dict:
    """Same weights, same batch: the reference loss and CaptionModel's loss agree (same objective)."""
    import torch

    from prefixcap.data.loader import CaptionDataset, collate
    from prefixcap.model.language_models import load_tokenizer
    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel

    model, dataset = build_reference(data_dir, only_prefix=True)
    cfg = CaptionConfig(language_model=CaptionDataset(data_dir).manifest.tokenizer, mapping=MappingConfig("mlp", 512, 768, 10), only_prefix=True)
    ours = CaptionModel(cfg, lm=model.lm, tokenizer=load_tokenizer(CaptionDataset(data_dir).manifest.tokenizer))
    ours.mapper = model.mapper
    ours.eval()
    model.eval()
    idx = list(range(6))
    with torch.no_grad():
        ref = model(*(torch.stack(x) for x in zip(*(dataset[i] for i in idx)))).item()
        emb, tokens, mask = collate([CaptionDataset(data_dir)[i] for i in idx])
        got = ours(emb.float(), tokens, mask).item()
    return {"reference_loss": ref, "prefixcap_loss": got, "abs_diff": abs(ref - got)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps: a few minutes on 2 CPU cores")
    p.add_argument("--batch_size", type=int, default=0, help="default 16 (quick) / 40 (the paper's)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per side (after warm-up)")
    p.add_argument("--num_workers", type=int, default=2, help="prefixcap loader worker processes")
    p.add_argument("--no_finetune", action="store_true", help="skip the fine-tuning pair")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = p.parse_args(argv)
    set_threads(args.threads)
    q = args.quick
    batch = args.batch_size or (16 if q else 40)
    steps = args.steps or (2 if q else 8)
    warmup = 1 if q else 2
    num_captions = 2_000 if q else 20_000
    settings = {"threads": args.threads, "mode": "quick" if q else "full", "lm": "GPT-2 small (random weights, vocab 50257)",
                "mapper": "mlp K=10", "dtype": "float32 (CPU)", "batch_size": batch, "timed_steps": steps,
                "warmup_steps": warmup, "num_captions": num_captions, "prefixcap_num_workers": args.num_workers,
                "prefixcap_group_by_length": True}
    info = machine_info()
    print_header("bench_train", settings, info)
    data_dir = make_dataset(num_captions)
    from prefixcap.data.shards import load_preprocessed

    lengths = load_preprocessed(data_dir).lengths()
    settings["caption_tokens"] = {"mean": round(float(lengths.mean()), 2), "std": round(float(lengths.std()), 2),
                                  "max": int(lengths.max())}
    print(f"captions: {settings['caption_tokens']}")
    figures: dict = {}
    check = check_same_loss(data_dir)
    figures["same_loss_check"] = check
    print(f"loss check (same weights, same batch): reference {check['reference_loss']:.5f} vs prefixcap "
          f"{check['prefixcap_loss']:.5f}")
    modes = [("frozen", True)] + ([] if args.no_finetune else [("finetune", False)])
    for name, only_prefix in modes:
        print(f"[{name}] reference loop ...", flush=True)
        ref = run_reference(data_dir, batch, steps, warmup, only_prefix)
        print(f"  reference {ref['samples_per_s']:.2f} samples/s (pad to {ref['padded_caption_len']} tokens)")
        print(f"[{name}] prefixcap train ...", flush=True)
        ours = run_prefixcap(data_dir, batch, steps, warmup, only_prefix, args.num_workers)
        print(f"  prefixcap {ours['samples_per_s']:.2f} samples/s (mean batch length "
              f"{ours['padded_caption_len_mean']:.1f} tokens)")
        figures[f"{name}_reference_samples_per_s"] = round(ref["samples_per_s"], 3)
        figures[f"{name}_prefixcap_samples_per_s"] = round(ours["samples_per_s"], 3)
        figures[f"{name}_speedup"] = ratio(ours["samples_per_s"], ref["samples_per_s"])
        figures[f"{name}_reference_pad_len"] = ref["padded_caption_len"]
        figures[f"{name}_prefixcap_mean_batch_len"] = round(ours["padded_caption_len_mean"], 2)
        figures[f"{name}_reference_step_s"] = [round(x, 3) for x in ref["step_s"]]
        figures[f"{name}_prefixcap_step_s"] = [round(x, 3) for x in ours["step_s"]]
        print(f"  => {name} speed-up {figures[f'{name}_speedup']}x")
    notes = ["Reference and prefixcap alternate on the same shared machine; each figure is steady-state "
             "(warm-up steps dropped); prefixcap's checkpoint writes are disabled for timing."]
    write_result("train", settings, info, figures, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
