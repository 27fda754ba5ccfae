"""Caption generation against this machine's own limits, all measured in one run with one thread count.

The machine's limits (measured first, in this process):
  GEMM      sustained fp32 matmul rate (2048^3, median of several) -> the FLOP bound of a caption:
            greedy 2·P·(K+T) FLOPs (P = LM parameters, K prefix positions, T new tokens: the issue's
            "2 x 124.4 M x 30"); beam b 2·P·(K + b·T) (the prefix runs once per input, then b beams).
  stream    read bandwidth (GB/s: the best of a sum over a 1 GiB tensor and a matrix-vector product over
            a 0.5 GiB matrix) -> the batch-1 latency bound: T forward passes that each read the LM's
            weights once (T · bytes / bandwidth).
prefixcap: `Captioner.generate`, GPT-2 small (random init: speed does not depend on the weights), MLP
mapper K=10, exactly T=20 new tokens (random weights never emit the end token; checked), fp32: greedy
and beam 5 at batch 1, 32 and 128, each as a fraction of its bound. Side by side in the same run: the
layers as `Captioner.from_pretrained` loads them (oneDNN-prepacked, model/packing.py) and the plain
ones (`pack_weights=False`), with the tokens compared; greedy and beam captions/s by batch size (the
re-caption default comes from them); with --int8, `--quantize int8` against fp32 at batch 1. Then the
original ClipCap loops (bench/reference.py, on the plain layers as the original ran) on a few images for
the speed-up ratios bench_generate reports. Every ratio is of two figures from this run; a summary
against the bounds is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from bench.common import load_average, machine_info, print_header, ratio, set_threads, write_result

K, T = 10, 20  # prefix positions, new tokens


def gemm_gflops(n: int = 2048, repeats: int = 12) -> float:
    """Sustained fp32 GEMM rate: the median of `repeats` n^3 products after a warm-up."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def read_gbps(repeats: int = 8) -> dict[str, float]:
    """Read bandwidth two ways (median each): a reduction over 1 GiB, and a GEMV over a 0.5 GiB matrix
    (how batch-1 decoding reads a weight). The larger is the bound: both only have to read."""
    import torch

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    x = torch.randn(256 * 1024 * 1024)  # 1 GiB
    out = {"sum": x.numel() * 4 / median_s(x.sum) / 1e9}
    del x
    w, v = torch.randn(16384, 8192), torch.randn(8192)  # 0.5 GiB
    out["gemv"] = w.numel() * 4 / median_s(lambda: torch.mv(w, v)) / 1e9
    return out


def build(pack: bool, quantize: str | None = None):
    """The benchmark captioner, saved once and loaded the way users load it (from_pretrained)."""
    import torch

    from bench.builders import CLIP_DIR, build_clip_vit_b32, build_gpt2_small
    from bench.common import WORK
    from prefixcap.caption.captioner import Captioner
    from prefixcap.model import CaptionConfig, CaptionModel
    from prefixcap.model.mapping import MappingConfig

    path = WORK / "limits_model"
    if not (path / "config.json").is_file():
        build_clip_vit_b32()
        torch.manual_seed(0)
        cfg = CaptionConfig(clip_model=str(CLIP_DIR), language_model=str(build_gpt2_small()), lm_family="causal",
                            mapping=MappingConfig(mapping_type="mlp", prefix_size=512, lm_dim=768, prefix_length=K),
                            only_prefix=True, max_token_length=67)
        CaptionModel(cfg).save_pretrained(path)
    kwargs: dict[str, Any] = {"pack_weights": pack}
    if quantize:
        kwargs["quantize"] = quantize
    return Captioner.from_pretrained(path, **kwargs)


def time_generate(cap, emb, settings, repeats: int) -> tuple[float, list[list[int]]]:
    """Fastest of `repeats` calls of Captioner.generate on one batch (after a warm-up call), and its tokens."""
    out = cap.generate(emb, settings)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = cap.generate(emb, settings)
        best = min(best, time.perf_counter() - start)
    return best, out.tokens


def measure_decoding(args, gflops: float, gbps: float) -> dict[str, Any]:
    import torch

    from prefixcap.generation import GenerationSettings

    plain = build(pack=False)
    fast = build(pack=True)
    params = sum(p.numel() for p in plain.model.lm.parameters())  # 124.4 M for GPT-2 small
    position_table = plain.model.lm.transformer.wpe.weight.numel()
    stream_bytes = (params - position_table) * 4  # each forward pass reads every weight once, the head included
    figures: dict[str, Any] = {"lm_parameters": params, "bytes_per_forward": stream_bytes}
    bound_latency_s = T * stream_bytes / (gbps * 1e9)
    figures["batch1_stream_bound_ms"] = round(bound_latency_s * 1000, 1)
    gen = torch.Generator().manual_seed(0)
    for beams in (1, 5):
        flops = 2 * params * (K + beams * T)
        bound_cps = gflops * 1e9 / flops
        for batch in args.batches:
            emb = torch.randn(batch, 512, generator=gen)
            settings = GenerationSettings(num_beams=beams, max_new_tokens=T)
            row: dict[str, Any] = {"bound_captions_per_s": round(bound_cps, 3)}
            for name, cap in (("plain", plain), ("packed", fast)):
                seconds, tokens = time_generate(cap, emb, settings, args.repeats if batch > 1 else 3 * args.repeats)
                assert all(len(t) == T for t in tokens), "a caption stopped early: the bound assumes T tokens"
                row[f"{name}_s"] = round(seconds, 4)
                row[f"{name}_captions_per_s"] = round(batch / seconds, 3)
                row[f"{name}_of_flop_bound"] = ratio(batch / seconds, bound_cps)
                row[f"{name}_tokens"] = tokens
            row["identical_tokens"] = row.pop("plain_tokens") == row.pop("packed_tokens")
            row["packed_over_plain"] = ratio(row["plain_s"], row["packed_s"])
            if batch == 1 and beams == 1:
                row["packed_over_stream_bound"] = ratio(row["packed_s"], bound_latency_s)
                row["plain_over_stream_bound"] = ratio(row["plain_s"], bound_latency_s)
            key = f"{'greedy' if beams == 1 else f'beam{beams}'}_b{batch}"
            figures[key] = row
            print(f"{key:>12}: packed {row['packed_captions_per_s']:8.2f} cap/s = {row['packed_of_flop_bound']:.3f} "
                  f"of the FLOP bound (plain {row['plain_of_flop_bound']:.3f}, x{row['packed_over_plain']:.2f}); "
                  f"tokens identical: {row['identical_tokens']}"
                  + (f"; {row['packed_s'] * 1000:.0f} ms = {row['packed_over_stream_bound']:.2f}x the "
                     f"{bound_latency_s * 1000:.0f} ms streaming bound" if "packed_over_stream_bound" in row else ""),
                  flush=True)
    for beams, batches in ((1, args.sweep), (5, args.beam_sweep)):  # the re-caption default batch comes from these
        sweep = figures[f"{'greedy' if beams == 1 else 'beam5'}_sweep"] = {}
        for batch in batches:
            seconds, _ = time_generate(fast, torch.randn(batch, 512, generator=gen),
                                       GenerationSettings(num_beams=beams, max_new_tokens=T), args.repeats)
            sweep[batch] = round(batch / seconds, 3)
        if sweep:
            print(f"   beam {beams} captions/s by batch: " + ", ".join(f"{b}: {c:.2f}" for b, c in sweep.items()),
                  flush=True)
    if args.int8:
        figures["int8_b1"] = measure_int8(fast, bound_latency_s)
    figures["reference"] = measure_reference(plain, figures, args)
    return figures


def measure_int8(fast, bound_latency_s: float) -> dict[str, Any]:
    """Batch-1 greedy: int8 against the fp32 layers from_pretrained loads by default (same run)."""
    import torch

    from prefixcap.generation import GenerationSettings

    cap = build(pack=False, quantize="int8")  # int8 replaces the layers packing would pack
    settings = GenerationSettings(max_new_tokens=T)
    emb = torch.randn(16, 512, generator=torch.Generator().manual_seed(1))
    fp32_s, fp32_tokens, int8_s, int8_tokens = [], [], [], []
    for i in range(emb.shape[0]):  # one image at a time: the latency case
        s, tok = time_generate(fast, emb[i:i + 1], settings, 1)
        fp32_s.append(s)
        fp32_tokens += tok
        s, tok = time_generate(cap, emb[i:i + 1], settings, 1)
        int8_s.append(s)
        int8_tokens += tok
    fp32, int8 = statistics.median(fp32_s), statistics.median(int8_s)
    same = sum(a == b for a, b in zip(fp32_tokens, int8_tokens)) / len(fp32_tokens)
    print(f"    int8 b1: {int8 * 1000:.0f} ms vs fp32 {fp32 * 1000:.0f} ms: x{fp32 / int8:.2f}; "
          f"identical captions {same:.2f} (random weights: no quality figure)", flush=True)
    return {"fp32_ms": round(fp32 * 1000, 1), "int8_ms": round(int8 * 1000, 1), "speedup": ratio(fp32, int8),
            "int8_over_fp32_stream_bound": ratio(int8, bound_latency_s), "identical_caption_fraction": same}


def measure_reference(plain, figures: dict[str, Any], args) -> dict[str, Any]:
    """The original ClipCap loops (bench/reference.py) on the plain layers (as the original ran), per image,
    on `--reference_images` images, vs the Captioner's per-image time at batch 32 measured above."""
    import torch

    from bench.bench_generate import time_reference
    from bench.reference import beam_generate, greedy_generate2

    n = args.reference_images
    emb = torch.randn(n, 512, generator=torch.Generator().manual_seed(2))
    out: dict[str, Any] = {"images": n}
    for name, fn, kw in (("greedy", greedy_generate2, {"entry_length": T}),
                         ("beam5", beam_generate, {"beam_size": 5, "entry_length": T})):
        ours = figures.get(f"{name}_b32")
        if ours is None:
            continue
        ref_s, _ = time_reference(fn, plain.model, emb, **kw)
        ref_per_image, ours_per_image = ref_s / n, ours["packed_s"] / 32
        out[name] = {"reference_ms_per_image": round(ref_per_image * 1000, 1),
                     "prefixcap_ms_per_image": round(ours_per_image * 1000, 2),
                     "speedup": ratio(ref_per_image, ours_per_image)}
        print(f"   original ClipCap {name}: x{out[name]['speedup']:.1f} per image ({ref_per_image * 1000:.0f} ms "
              f"per image, one at a time, vs {ours_per_image * 1000:.1f} ms at batch 32)", flush=True)
    return out


def print_summary(figures: dict[str, Any]) -> None:
    """The figures against their bounds (the better GEMM rate of the run's start and end), at the end."""
    print(f"\nsummary (FLOP bound from {figures['gemm_gflops_bound']} GFLOP/s):")
    for key, row in figures.items():
        if isinstance(row, dict) and "bound_captions_per_s" in row:
            print(f"  {key:>12}: {row['packed_captions_per_s']:8.2f} captions/s = {row['packed_of_flop_bound']:.3f} of "
                  f"the FLOP bound (plain layers {row['plain_of_flop_bound']:.3f}); tokens identical: "
                  f"{row['identical_tokens']}")
    b1 = figures.get("greedy_b1", {})
    if "packed_over_stream_bound" in b1:
        print(f"  batch-1 greedy: {b1['packed_s'] * 1000:.0f} ms = {b1['packed_over_stream_bound']:.2f}x the "
              f"{figures['batch1_stream_bound_ms']:.0f} ms weight-streaming bound")
    if "speedup" in figures.get("int8_b1", {}):
        print(f"  int8 at batch 1: x{figures['int8_b1']['speedup']:.2f} vs fp32")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads for every figure, the bounds included (default: all cores)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--sweep", type=int, nargs="*", default=[8, 16, 32, 64, 128, 256],
                   help="greedy captions/s at these batch sizes (the re-caption default is chosen from it)")
    p.add_argument("--beam_sweep", type=int, nargs="*", default=[16, 64], help="the same for beam 5")
    p.add_argument("--repeats", type=int, default=2, help="keep the fastest of N timed calls per figure")
    p.add_argument("--reference_images", type=int, default=8)
    p.add_argument("--int8", action="store_true", help="also time --quantize int8 at batch 1")
    p.add_argument("--quick", action="store_true",
                   help="batches 1 and 32, one timed call each, 2 reference images: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.reference_images, args.repeats, args.sweep, args.beam_sweep = [1, 32], 2, 1, [8], []
    set_threads(args.threads)
    info = machine_info()
    settings = {"threads": args.threads, "batches": args.batches, "prefix_length": K, "new_tokens": T,
                "repeats": args.repeats, "lm": "GPT-2 small (random init)", "dtype": "float32"}
    print_header("bench_limits", settings, info)
    gflops = gemm_gflops()
    bandwidth = read_gbps()
    gbps = max(bandwidth.values())
    print(f"machine: fp32 GEMM {gflops:.1f} GFLOP/s; read {bandwidth['sum']:.1f} GB/s (sum), "
          f"{bandwidth['gemv']:.1f} GB/s (GEMV)", flush=True)
    figures: dict[str, Any] = {"gemm_gflops": round(gflops, 1),
                               "read_gbps": {k: round(v, 1) for k, v in bandwidth.items()}}
    figures.update(measure_decoding(args, gflops, gbps))
    after = gemm_gflops()
    figures["gemm_gflops_after"] = round(after, 1)
    print(f"machine after: fp32 GEMM {after:.1f} GFLOP/s; load {load_average()}")
    if after > gflops:  # the bound is the machine's best rate seen in this run: fractions are never flattered
        for row in figures.values():
            if isinstance(row, dict) and "bound_captions_per_s" in row:
                row["bound_captions_per_s"] = round(row["bound_captions_per_s"] * after / gflops, 3)
                for side in ("plain", "packed"):
                    row[f"{side}_of_flop_bound"] = ratio(row[f"{side}_captions_per_s"], row["bound_captions_per_s"])
    figures["gemm_gflops_bound"] = round(max(gflops, after), 1)
    print_summary(figures)
    write_result("limits" if not args.quick else "limits_quick", settings, info, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
