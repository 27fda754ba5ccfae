"""Generation throughput: prefixcap's Captioner (batch 32, KV cache) vs the original per-image loops.

Both sides start from the same CLIP embeddings and run the same mapper + GPT-2 small weights.
  greedy: Captioner.caption_embeddings(num_beams=1, batch 32)  vs  reference.greedy_generate2 per image
  beam 5: Captioner.caption_embeddings(num_beams=5, batch 32)  vs  reference.beam_generate per image
The greedy token sequences must be identical. Full mode gives both sides the original's 67-token
budget; with random weights no caption stops early, so every caption is 67 tokens. A second pair
of figures (and --quick's only pair) caps both sides at 20 tokens, about a real COCO caption,
where the no-cache loop's quadratic cost hurts it less. Also captions/s vs batch size (greedy).
Beam 5 is also timed with `generate`'s own prefill (the prefix run once per beam, as before the
Captioner shared it across beams), to show what sharing the prefix gains in the same run.
`--repeats N` times every side N times and keeps the fastest (a shared machine's load spikes).
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import (
    THREADS_HELP,
    machine_info,
    print_header,
    ratio,
    set_threads,
    write_result,
)


def build_captioner(mapping_type: str, prefix_length: int, pack: bool = True):
    """(Captioner, reference model): the same weights twice; the Captioner's LM layers oneDNN-prepacked as
    `Captioner.from_pretrained` loads them (unless `pack` is False), the reference's plain, as the original ran."""
    import copy

    import torch

    from bench.builders import CLIP_DIR, build_clip_vit_b32, build_gpt2_small
    from prefixcap.caption.captioner import Captioner
    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel
    from prefixcap.model.packing import pack_linear_layers

    build_clip_vit_b32()
    gpt2 = build_gpt2_small()
    torch.manual_seed(0)
    cfg = CaptionConfig(clip_model=str(CLIP_DIR), language_model=str(gpt2), lm_family="causal",
                        mapping=MappingConfig(mapping_type=mapping_type, prefix_size=512, lm_dim=768,
                                              prefix_length=prefix_length),
                        only_prefix=True, max_token_length=67)
    model = CaptionModel(cfg).eval()
    ours = copy.deepcopy(model)
    if pack:
        pack_linear_layers(ours.lm)
    return Captioner(ours), model


def time_reference(fn, model, embeddings, repeats: int = 1, **kw) -> tuple[float, list]:
    """Fastest of `repeats` runs of the original per-image loop over `embeddings`, and its outputs."""
    import torch

    best = float("inf")
    for _ in range(repeats):
        outs = []
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(embeddings.shape[0]):
                prefix = model.prefix(embeddings[i:i + 1])  # (1, K, D)
                outs.append(fn(model.lm, prefix, stop_token=model.tokenizer.eos_token_id, **kw))
        best = min(best, time.perf_counter() - start)
    return best, outs


def time_captioner(captioner, embeddings, batch_size: int, repeats: int = 1,
                   generate_kwargs: dict | None = None, **kw) -> tuple[float, list[list[int]]]:
    """Fastest of `repeats` runs of Captioner.generate over `embeddings` in batches, and its tokens.
    `kw` are GenerationSettings fields; `generate_kwargs` go to the LM's generate as they are."""
    settings = captioner.settings.split_kwargs(captioner.settings, kw)[0]
    best = float("inf")
    for _ in range(repeats):
        tokens: list[list[int]] = []
        start = time.perf_counter()
        for s in range(0, embeddings.shape[0], batch_size):
            tokens += captioner.generate(embeddings[s:s + batch_size], settings, **(generate_kwargs or {})).tokens
        best = min(best, time.perf_counter() - start)
    return best, tokens


# A generate keyword that sets up generate's own cache makes the Captioner leave the prefill to
# generate, which runs the whole prefix once per beam: the Captioner's beam search before it shared
# the prefix across beams (same decoding, same cache class).
PER_BEAM_PREFILL = {"cache_implementation": "dynamic"}


def short_pairs(captioner, model, emb, settings, short: int, repeats: int):
    """Both sides capped at `short` tokens: (ref greedy s, ours greedy s, ref beam s, ours beam s)."""
    from bench import reference

    n_ref, n_ref_b, n_cap = settings["ref_greedy_images"], settings["ref_beam_images"], settings["captioner_images"]
    b, r = settings["batch_size"], repeats
    print(f"greedy and beam 5, both capped at {short} tokens ...", flush=True)
    t_ref_s, _ = time_reference(reference.greedy_generate2, model, emb[:n_ref], r, entry_length=short)
    t_cap_s, _ = time_captioner(captioner, emb[:n_cap], b, r, max_new_tokens=short)
    t_ref_bs, _ = time_reference(reference.beam_generate, model, emb[:n_ref_b], r, beam_size=5, entry_length=short)
    t_cap_bs, _ = time_captioner(captioner, emb[:n_cap], b, r, max_new_tokens=short, num_beams=5)
    return t_ref_s, t_cap_s, t_ref_bs, t_cap_bs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few images: a few minutes on 2 CPU cores")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--mapping_type", default="mlp")
    p.add_argument("--prefix_length", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--max_tokens", type=int, default=0,
                   help="token budget of the main pair (default: 20 with --quick, else the original's 67)")
    p.add_argument("--no_short", action="store_true", help="skip the 20-token pair and the batch-size curve")
    p.add_argument("--result_name", default="generate", help="bench/results/<name>.json")
    p.add_argument("--repeats", type=int, default=1, help="time every side this many times, keep the fastest")
    p.add_argument("--plain_layers", action="store_true",
                   help="the Captioner on the plain layers too (pack_weights=False; before 2026-12-06 it always was)")
    args = p.parse_args(argv)

    import torch

    from bench import reference

    set_threads(args.threads)
    q = args.quick
    settings = {"threads": args.threads, 
        "mode": "quick" if q else "full", "lm": "GPT-2 small (random weights, vocab 50257)",
        "mapper": f"{args.mapping_type} K={args.prefix_length}", "dtype": "float32",
        "batch_size": args.batch_size, "entry_length": args.max_tokens or (20 if q else reference.ENTRY_LENGTH),
        "ref_greedy_images": 1 if q else 4, "ref_beam_images": 1 if q else 2,
        "captioner_images": args.batch_size,
        "short_length": 20, "curve_batches": [1, 8, 32] if q else [1, 2, 4, 8, 16, 32, 64],
        "repeats": args.repeats,
        "captioner_layers": "plain" if args.plain_layers else "packed (as from_pretrained loads)",
        "reference_layers": "plain",
    }
    info = machine_info()
    print_header("bench_generate", settings, info)
    captioner, model = build_captioner(args.mapping_type, args.prefix_length, pack=not args.plain_layers)
    torch.manual_seed(1)
    emb = torch.randn(max(settings["captioner_images"], max(settings["curve_batches"])), 512)  # (N, C)
    n_cap = settings["captioner_images"]
    # Warm-up both paths once (allocator, kernels, generate's setup).
    captioner.generate(emb[:2], captioner.settings.split_kwargs(None, {"max_new_tokens": 3})[0])
    reference.greedy_generate2(model.lm, model.prefix(emb[:1]), stop_token=0, entry_length=2)

    figures: dict[str, float | int | bool | list] = {}
    print("greedy: reference (per image, no cache) ...", flush=True)
    n_ref = settings["ref_greedy_images"]
    budget = settings["entry_length"]
    reps = args.repeats
    t_ref, ref_tokens = time_reference(reference.greedy_generate2, model, emb[:n_ref], reps, entry_length=budget)
    print("greedy: Captioner ...", flush=True)
    t_cap, cap_tokens = time_captioner(captioner, emb[:n_cap], args.batch_size, reps, max_new_tokens=budget)
    eos = model.tokenizer.eos_token_id
    ref_trimmed = [t[:-1] if t and t[-1] == eos else t for t in ref_tokens]
    identical = [a == b for a, b in zip(ref_trimmed, cap_tokens[:n_ref])]
    figures.update(
        greedy_ref_captions_per_s=n_ref / t_ref, greedy_captions_per_s=n_cap / t_cap,
        greedy_speedup=ratio(n_cap / t_cap, n_ref / t_ref), greedy_identical=all(identical),
        greedy_identical_count=f"{sum(identical)}/{len(identical)}",
        greedy_mean_tokens=sum(len(t) for t in ref_tokens) / n_ref,
    )
    print(f"  reference {n_ref / t_ref:.3f} captions/s | Captioner {n_cap / t_cap:.3f} captions/s | "
          f"speed-up {figures['greedy_speedup']}x | identical outputs {figures['greedy_identical_count']}")

    print("beam 5: reference (original generate_beam per image) ...", flush=True)
    n_ref_b = settings["ref_beam_images"]
    t_ref_b, ref_beams = time_reference(reference.beam_generate, model, emb[:n_ref_b], reps, beam_size=5,
                                        entry_length=budget)
    print("beam 5: Captioner ...", flush=True)
    t_cap_b, cap_beams = time_captioner(captioner, emb[:n_cap], args.batch_size, reps, max_new_tokens=budget,
                                        num_beams=5)
    print("beam 5: Captioner with generate's per-beam prefill ...", flush=True)
    t_old_b, old_beams = time_captioner(captioner, emb[:n_cap], args.batch_size, reps, PER_BEAM_PREFILL,
                                        max_new_tokens=budget, num_beams=5)
    same_best = sum(r[0][0][:-1] == c or r[0][0] == c for r, c in zip(ref_beams, cap_beams))
    figures.update(beam5_ref_captions_per_s=n_ref_b / t_ref_b, beam5_captions_per_s=n_cap / t_cap_b,
                   beam5_speedup=ratio(n_cap / t_cap_b, n_ref_b / t_ref_b),
                   beam5_same_best_count=f"{same_best}/{n_ref_b}",
                   beam5_per_beam_prefill_captions_per_s=n_cap / t_old_b,
                   beam5_per_beam_prefill_speedup=ratio(n_cap / t_old_b, n_ref_b / t_ref_b),
                   beam5_shared_prefix_gain=ratio(t_old_b, t_cap_b),
                   beam5_shared_prefix_identical=old_beams == cap_beams)
    print(f"  reference {n_ref_b / t_ref_b:.3f} captions/s | Captioner {n_cap / t_cap_b:.3f} captions/s | "
          f"speed-up {figures['beam5_speedup']}x | with per-beam prefill {n_cap / t_old_b:.3f} captions/s "
          f"({figures['beam5_per_beam_prefill_speedup']}x; identical tokens {old_beams == cap_beams})")

    short = settings["short_length"]
    if args.no_short:
        figures = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}
        write_result(args.result_name, settings, info, figures, [])
        return 0
    if budget == short:  # quick mode: the main pair already is the short one
        t_ref_s, t_cap_s, t_ref_bs, t_cap_bs = t_ref, t_cap, t_ref_b, t_cap_b
    else:
        t_ref_s, t_cap_s, t_ref_bs, t_cap_bs = short_pairs(captioner, model, emb, settings, short, reps)
    figures.update(greedy20_ref_captions_per_s=n_ref / t_ref_s, greedy20_captions_per_s=n_cap / t_cap_s,
                   greedy20_speedup=ratio(n_cap / t_cap_s, n_ref / t_ref_s))
    figures.update(beam5_20_ref_captions_per_s=n_ref_b / t_ref_bs, beam5_20_captions_per_s=n_cap / t_cap_bs,
                   beam5_20_speedup=ratio(n_cap / t_cap_bs, n_ref_b / t_ref_bs))
    print(f"  speed-ups at {short} tokens: greedy {figures['greedy20_speedup']}x, beam 5 {figures['beam5_20_speedup']}x")
    curve = []
    for b in settings["curve_batches"]:
        if b == n_cap == args.batch_size and budget == short:
            t = t_cap  # already measured
        else:
            t, _ = time_captioner(captioner, emb[:b], b, max_new_tokens=short)
        curve.append({"batch_size": b, "captions_per_s": b / t,
                      "speedup_vs_reference": ratio(b / t, n_ref / t_ref_s)})
        print(f"  curve: batch {b:3d} -> {b / t:.2f} captions/s ({short} tokens)")
    figures["curve_greedy_20_tokens"] = curve
    figures = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}
    notes = [
        "Random weights never emit end-of-text early, so every caption runs the full budget on both sides.",
        "The reference re-runs GPT-2 (incl. its 50257-wide LM head) on every position at every step;"
        " the Captioner uses HF generate with a KV cache on whole batches.",
        "beam5_per_beam_prefill_*: the same Captioner with generate's own prefill (the K prefix positions once"
        " per beam, as before the Captioner shared them across beams), timed in the same run.",
    ]
    write_result(args.result_name, settings, info, figures, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
