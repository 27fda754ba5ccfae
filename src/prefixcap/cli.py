"""One command-line entry point: `prefixcap {preprocess,train,caption,evaluate,serve,push,demo,datastore}`."""

from __future__ import annotations

import sys
from importlib import import_module

# Registry of subcommands: name -> (module, one-line help). Each module exposes
# `main(argv: list[str] | None) -> int` that parses its own flags, so `train.py` and
# `create_dataset.py` at the repository root can reuse exactly the same parsers.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("prefixcap.preprocess.cli", "encode images with CLIP and tokenize captions into shards"),
    "train": ("prefixcap.train.cli", "train the mapping network (and optionally the LM)"),
    "caption": ("prefixcap.caption.cli", "caption images, folders, shards or embeddings"),
    "evaluate": ("prefixcap.evaluate.cli", "COCO caption metrics and CLIPScore"),
    "serve": ("prefixcap.serve.cli", "HTTP captioning service with a web page"),
    "push": ("prefixcap.model.push_cli", "upload a trained model with its model card to the Hugging Face Hub"),
    "demo": ("prefixcap.demo.cli", "offline end-to-end demo on a synthetic dataset"),
    "datastore": ("prefixcap.retrieval.cli", "build a caption datastore (FAISS) for retrieval-augmented captioning"),
}


def _usage() -> str:
    lines = ["usage: prefixcap <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `prefixcap <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from prefixcap import __version__

        print(f"prefixcap {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"prefixcap: unknown command {name!r}; expected one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    from prefixcap.errors import PrefixcapError, exit_code_for

    try:
        module = import_module(SUBCOMMANDS[name][0])
        return int(module.main(rest) or 0)
    except (PrefixcapError, KeyboardInterrupt) as err:
        # Each command reports its own errors; this is the one place that turns any that get
        # through into the shared convention (one line, exit 2 usage / 1 runtime / 130 Ctrl-C).
        message = "interrupted" if isinstance(err, KeyboardInterrupt) else str(err)
        print(f"prefixcap {name}: {message}", file=sys.stderr)
        return exit_code_for(err)


if __name__ == "__main__":
    sys.exit(main())
