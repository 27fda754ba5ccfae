"""Profile Captioner beam-5 / greedy generation (batch 32) to see where the time goes (torch.profiler)."""

from __future__ import annotations

import argparse
import sys

from bench.common import THREADS_HELP, set_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = p.parse_args(argv)
    set_threads(args.threads)
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.bench_generate import build_captioner

    cap, _ = build_captioner("mlp", 10)  # the Captioner as from_pretrained loads it (packed layers)
    emb = torch.randn(args.batch_size, 512)
    settings = cap.settings.split_kwargs(None, {"max_new_tokens": args.tokens, "num_beams": args.num_beams})[0]
    cap.generate(emb[:2], settings)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cap.generate(emb, settings)
    print(f"wall {time.perf_counter() - start:.2f}s (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return 0


if __name__ == "__main__":
    sys.exit(main())
