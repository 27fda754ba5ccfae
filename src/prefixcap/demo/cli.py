"""`prefixcap demo`: the command line of the offline demo (flags -> DemoConfig -> run_demo)."""

from __future__ import annotations

import argparse
import sys

from prefixcap.argtypes import ArgumentParser, non_negative_int, positive_int
from prefixcap.demo.run import QUICK, DemoConfig, run_demo


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = ArgumentParser(prog="prefixcap demo",
                                description="Offline end-to-end demo: the whole pipeline learns to caption "
                                            "synthetic shapes with a tiny CLIP and a tiny GPT-2.")
    p.add_argument("--workdir", default=d.workdir, help="everything the demo writes stays here")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true",
                   help="smaller run (~100 s on 2 cores instead of ~180 s): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + "; explicit size flags still win")
    p.add_argument("--num_train", type=positive_int, help=f"training images (default {d.num_train})")
    p.add_argument("--num_test", type=positive_int, help=f"held-out images (default {d.num_test})")
    p.add_argument("--clip_max_steps", type=non_negative_int,
                   help=f"tiny-CLIP training steps (default {d.clip_max_steps}); 0: train for --clip_seconds")
    p.add_argument("--clip_seconds", type=float, help=f"tiny-CLIP time budget when --clip_max_steps 0 "
                                                      f"(default {d.clip_seconds:g})")
    p.add_argument("--epochs", type=positive_int, help=f"caption-model training epochs (default {d.epochs})")
    p.add_argument("--batch_size", type=positive_int, help=f"caption-model batch size (default {d.batch_size})")
    p.add_argument("--eval_metrics", help="evaluate only these metrics (evaluate's --metrics, e.g. "
                                          "bleu,rouge,cider,clipscore); default: all but SPICE")
    p.add_argument("--threads", type=positive_int, default=d.threads,
                   help="torch intra-op threads (default %(default)s; keep it <= the free CPU cores: "
                        "oversubscribed threads make tiny models many times slower)")
    return p


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Defaults, then --quick's sizes, then any size flag given explicitly."""
    values = {k: v for k, v in vars(args).items() if k != "quick" and v is not None}
    if values.get("clip_max_steps") == 0:
        values["clip_max_steps"] = None
    base = QUICK if args.quick else {}
    return DemoConfig(**{**base, **values})


def main(argv: list[str] | None = None) -> int:
    run_demo(config_from_args(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
