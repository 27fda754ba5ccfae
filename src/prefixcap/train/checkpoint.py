"""Training checkpoints: a loadable model artifact plus `training_state/`, written atomically.

A checkpoint `{prefix}_latest.ckpt`, `{prefix}_{epoch}.ckpt` (epochs counted from 0, as the seed names
them: `demo_model_0.ckpt` is the model after the first epoch) or `{prefix}_final.ckpt` is a folder:
  config.json, mapper.safetensors, tokenizer/, [lm/]   the model artifact (CaptionModel.from_pretrained)
  training_state/trainer.json   epoch, batch position, optimizer step, samples seen, the run's settings
  training_state/state.pt       optimizer and scheduler state dicts and the main process's RNG states,
                                tensors and plain containers only: loaded with torch.load(weights_only=True)
  training_state/deepspeed/     DeepSpeed's partitioned optimizer states (DeepSpeed runs only)

The optimizer state (AdamW: twice the trained weights) is written into `_latest` only; epoch and
final checkpoints carry the model, the scheduler and the RNG states. Resuming from `_latest` is exact;
resuming from an epoch checkpoint restarts AdamW's moments (the trainer says so). With a frozen LM or
LoRA no checkpoint holds LM weights (LoRA: only the adapter, lm_adapter/).

The whole folder is assembled under a temporary name and swapped in with renames, so a crash or
`kill -9` at any instant leaves the previous checkpoint loadable (between the two renames of the
swap, `resolve_artifact` finds it under its `.old` name).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from prefixcap.model.captioning import CaptionModel, _swap_into_place, resolve_artifact

TRAINING_STATE = "training_state"
TRAINER_JSON = "trainer.json"
STATE_FILE = "state.pt"
DEEPSPEED_DIR = "deepspeed"


@dataclass
class TrainingState:
    """Where training stands; enough to continue exactly where it stopped."""

    epoch: int = 0  # the epoch in progress (0-based); == epochs when training is over
    batch_in_epoch: int = 0  # this rank's micro-batches of `epoch` already trained
    global_step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # captions trained on, all processes together
    finished: bool = False


def checkpoint_path(output_dir: str | Path, prefix: str, tag: str | int) -> Path:
    """`{output_dir}/{prefix}_{tag}.ckpt`, the seed's naming (tag: latest, an epoch number, final)."""
    return Path(output_dir) / f"{prefix}_{tag}.ckpt"


def epoch_checkpoints(output_dir: str | Path, prefix: str) -> list[tuple[int, Path]]:
    """[(epoch, path)] of the `{prefix}_{epoch}.ckpt` folders in output_dir, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(prefix) + r"_(\d+)\.ckpt")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def previous_run_files(output_dir: str | Path, prefix: str) -> list[Path]:
    """What a run with this prefix leaves in output_dir: checkpoints (with an interrupted swap's `.old`
    twins and killed saves' temporary folders) and the summary; sorted."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"\.*" + re.escape(prefix) + r"_(\d+|latest|final)\.ckpt(\.old|\.saving.*)?")
    found = [p for p in folder.iterdir() if pattern.fullmatch(p.name)]
    summary = folder / f"{prefix}_summary.json"
    return sorted(found + ([summary] if summary.exists() else []))


@contextlib.contextmanager
def _quiet_hf_progress() -> Iterator[None]:
    # save_pretrained's "Writing model shards" bar would break the epoch bar twice per save.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put the RNGs back as they were when the checkpoint was written."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _clean_stale(path: Path) -> None:
    # Leftovers of a save that was killed: the assembly folder and save_pretrained's own temp dirs.
    for stale in list(path.parent.glob(f".{path.name}.saving*")) + list(path.parent.glob(f"..{path.name}.saving.*")):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(path: str | Path, model: CaptionModel, optimizer: Any, scheduler: Any, state: TrainingState,
                    run_config: dict[str, Any], accelerator: Any = None, with_optimizer: bool = True,
                    merge_lora: bool = False) -> Path:
    """Write a checkpoint folder atomically. With an accelerator, every process must call this
    (they meet at barriers) but only the main process writes, except DeepSpeed's partitioned
    optimizer states, which each rank writes into the shared temporary folder.

    with_optimizer=False leaves the optimizer state out (the trainer keeps it in `_latest` only);
    merge_lora saves a LoRA model with the adapter merged into full LM weights."""
    path = Path(path)
    is_main = accelerator is None or accelerator.is_main_process
    tmp = path.parent / f".{path.name}.saving"
    deepspeed = accelerator is not None and getattr(accelerator.state, "deepspeed_plugin", None) is not None
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(path)
        with _quiet_hf_progress():
            model.save_pretrained(tmp, merge_lora=merge_lora)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if deepspeed and with_optimizer:
        accelerator.save_state(str(tmp / TRAINING_STATE / DEEPSPEED_DIR))
    if is_main:
        ts = tmp / TRAINING_STATE
        ts.mkdir(parents=True, exist_ok=True)
        payload = {"scheduler": scheduler.state_dict(), "rng": _rng_states()}
        if not deepspeed and with_optimizer:
            payload["optimizer"] = optimizer.state_dict()
        torch.save(payload, ts / STATE_FILE)
        (ts / TRAINER_JSON).write_text(json.dumps({"state": asdict(state), "run": run_config}, indent=2) + "\n")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main:
        _swap_into_place(tmp, path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return path


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` found: where, the training state and the saved state dicts."""

    path: Path  # the folder actually read (may be the `.old` twin of an interrupted swap)
    state: TrainingState
    run_config: dict[str, Any]
    payload: dict[str, Any]  # optimizer (absent under DeepSpeed), scheduler, rng

    @property
    def deepspeed_dir(self) -> Path:
        return self.path / TRAINING_STATE / DEEPSPEED_DIR


def has_checkpoint(path: str | Path) -> bool:
    try:
        folder = resolve_artifact(path)
    except FileNotFoundError:
        return False
    return (folder / TRAINING_STATE / TRAINER_JSON).is_file()


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint's training state (the model itself loads with CaptionModel.from_pretrained)."""
    folder = resolve_artifact(path)
    ts = folder / TRAINING_STATE
    if not (ts / TRAINER_JSON).is_file():
        raise FileNotFoundError(f"{folder} is a model artifact but not a training checkpoint: "
                                f"{TRAINING_STATE}/{TRAINER_JSON} is missing")
    meta = json.loads((ts / TRAINER_JSON).read_text())
    known = {f.name for f in fields(TrainingState)}
    state = TrainingState(**{k: v for k, v in meta["state"].items() if k in known})
    payload = torch.load(ts / STATE_FILE, map_location="cpu", weights_only=True)
    return LoadedCheckpoint(folder, state, meta.get("run", {}), payload)
