"""`prefixcap push MODEL REPO`: upload a saved model (or a checkpoint's model) to the Hugging Face Hub with its card."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from prefixcap.argtypes import ArgumentParser

PROG = "prefixcap push"


class PushUsageError(ValueError):
    """A refused argument (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Upload a prefixcap model folder (or a training "
                                "checkpoint's model, without its training state) to a Hugging Face Hub model repo.")
    p.add_argument("model", help="model folder (e.g. models/demo_model_final.ckpt)")
    p.add_argument("repo", help="Hub repo id, e.g. your-name/prefixcap-coco")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", default=None, help="Hub token (default: the one huggingface-cli login stored)")
    p.add_argument("--merge_lora", action="store_true",
                   help="upload a LoRA model with the adapter merged into full LM weights (lm/)")
    p.add_argument("--evaluation", default=None,
                   help="a `prefixcap evaluate` results json: its metrics go into the model card")
    p.add_argument("--commit_message", default=None)
    return p


def stage(model: str, folder: Path, merge_lora: bool = False, evaluation: str | None = None) -> Path:
    """Write what is uploaded into `folder`: the artifact without training state, with an up-to-date card."""
    from prefixcap.model.captioning import CONFIG_NAME, CaptionModel
    from prefixcap.model.config import CaptionConfig
    from prefixcap.model.card import CARD_DATA, evaluation_summary, render_card

    src = Path(model)
    if not (src / CONFIG_NAME).is_file():
        raise PushUsageError(f"{model}: not a prefixcap model folder ({CONFIG_NAME} is missing)")
    config = CaptionConfig.from_dict(json.loads((src / CONFIG_NAME).read_text()))
    info = json.loads((src / CARD_DATA).read_text()) if (src / CARD_DATA).is_file() else {}
    if evaluation:
        try:
            results = json.loads(Path(evaluation).read_text())
        except (OSError, ValueError) as err:
            raise PushUsageError(f"--evaluation {evaluation}: cannot read it as JSON ({err})") from err
        if not isinstance(results, dict) or not evaluation_summary(results):
            raise PushUsageError(f"--evaluation {evaluation}: no metrics in it (expected prefixcap evaluate's json)")
        info["evaluation"] = evaluation_summary(results)
    if merge_lora:
        if config.lora is None:
            raise PushUsageError(f"--merge_lora: {model} has no LoRA adapter (its LM is {config.lm_mode})")
        loaded = CaptionModel.from_pretrained(src)
        loaded.card_info = info
        return loaded.save_pretrained(folder, merge_lora=True)
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("training_state", ".*"))
    (folder / CARD_DATA).write_text(json.dumps(info, indent=2, default=str) + "\n")
    (folder / "README.md").write_text(render_card(config, info))
    return folder


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 uploaded, 2 a refused argument, 1 the upload failed."""
    args = build_parser().parse_args(argv)
    from prefixcap.model.hub import upload_artifact

    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = stage(args.model, Path(tmp) / "model", args.merge_lora, args.evaluation)
        except PushUsageError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        try:
            upload_artifact(folder, args.repo, private=args.private, token=args.token,
                            commit_message=args.commit_message)
        except Exception as err:  # noqa: BLE001 - network / auth / repo errors: one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            print(f"{PROG}: error: upload to {args.repo} failed: {first}", file=sys.stderr)
            return 1
    print(f"{PROG}: uploaded {args.model} to https://huggingface.co/{args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
