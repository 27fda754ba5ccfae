"""Where a training run starts: from scratch in a clean folder, or from a checked, restored checkpoint.

A previous run's checkpoints in the folder are refused (or deleted with --overwrite_output_dir);
--resume's checkpoint is checked against this run's settings and its optimizer, schedule and RNG
states are restored.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefixcap.train.config import TrainConfig, TrainConfigError

# Settings a resumed run must share with the run that wrote the checkpoint: the training ones (from
# the checkpoint's run settings) and the model's (from its config.json).
_RESUME_KEYS = ("batch_size", "seed", "gradient_accumulation_steps", "group_by_length", "num_processes",
                "num_train_captions", "val_fraction")
_MODEL_KEYS = ("lm_family", "normalize_prefix", "only_prefix", "mapping", "lora")


def check_previous_run(cfg: TrainConfig, acc, out: Path) -> None:
    """Refuse to mix two runs' checkpoints in one folder: --resume continues, --overwrite_output_dir restarts."""
    from prefixcap.train.checkpoint import previous_run_files

    found = previous_run_files(out, cfg.output_filename_prefix)
    if not found or cfg.resume:
        return
    if not cfg.overwrite_output_dir:
        names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise TrainConfigError(
            f"--output_dir {out} holds a previous run's checkpoints ({names}); continue it with --resume, "
            f"start afresh with --overwrite_output_dir (deletes them), or use another --output_dir or "
            "--output_filename_prefix")
    acc.wait_for_everyone()  # every rank has looked before the main process deletes
    if acc.is_main_process:
        import shutil

        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        acc.print(f"prefixcap train: --overwrite_output_dir: deleted {len(found)} file(s) of the previous run "
                  f"in {out}")
    acc.wait_for_everyone()


def run_settings(cfg: TrainConfig, world: int, num_train_captions: int) -> dict[str, Any]:
    """What a checkpoint records of the run (and a resume must match): the flags less the token, and the data
    (with --datastore, the datastore's identity too: check_resume_retrieval compares it)."""
    return {**{k: v for k, v in asdict(cfg).items() if k not in {"hf_kwargs", "resume"}},
            "hf_kwargs": {k: v for k, v in cfg.hf_kwargs.items() if k != "token"},
            "num_processes": world, "num_train_captions": num_train_captions,
            "datastore_identity": _datastore_identity(cfg.datastore)}


def _datastore_identity(folder: str | None) -> str | None:
    from prefixcap.retrieval.datastore import DatastoreError, DatastoreManifest

    try:
        return DatastoreManifest.read(folder).identity() if folder else None
    except DatastoreError:
        return None  # not a datastore: opening it refuses that with its own message


def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint folder --resume names (None without --resume); it may not exist yet."""
    from prefixcap.train.checkpoint import checkpoint_path

    if not cfg.resume:
        return None
    return checkpoint_path(cfg.output_dir, cfg.output_filename_prefix, "latest") if cfg.resume == "latest" \
        else Path(cfg.resume)


def check_resume_retrieval(cfg: TrainConfig) -> None:
    """Refuse to resume with another --datastore or --retrieval_k than the checkpoint was trained with (one line
    naming both), before this run computes any prompt into the folder.

    A datastore is the same when its manifest is (a copy elsewhere is the same datastore; a rebuild or an
    --append is not); a checkpoint that recorded no identity is compared by the datastore's resolved path.
    """
    from prefixcap.model.captioning import resolve_artifact
    from prefixcap.train.checkpoint import TRAINER_JSON, TRAINING_STATE, has_checkpoint

    path = resume_path(cfg)
    if path is None or not has_checkpoint(path):
        return
    path = resolve_artifact(path)
    then = (json.loads((path / "config.json").read_text()).get("retrieval") or {})
    then_store, then_k = then.get("datastore") or None, then.get("k")
    now_store = str(Path(cfg.datastore).resolve()) if cfg.datastore else None
    where = f"the checkpoint {path} was trained"
    if then_store is None and now_store is None:
        return
    if then_store is None:
        problem = f"--datastore {cfg.datastore}: {where} without retrieval; resume without --datastore"
    elif now_store is None:
        problem = (f"--datastore: {where} with --datastore {then_store} --retrieval_k {then_k}; resume with them, "
                   "not without retrieval")
    elif then_k != cfg.retrieval_k:
        problem = f"--retrieval_k {cfg.retrieval_k}: {where} with --retrieval_k {then_k}; resume with {then_k}"
    else:
        run = json.loads((path / TRAINING_STATE / TRAINER_JSON).read_text()).get("run", {})
        then_id, now_id = run.get("datastore_identity"), _datastore_identity(now_store)
        if (then_id == now_id) if then_id and now_id else then_store == now_store:
            return
        changed = " (its manifest differs: rebuilt or appended to since)" if then_store == now_store else ""
        problem = (f"--datastore {now_store}: {where} with --datastore {then_store}{changed}; resume with the "
                   "datastore it was trained with")
    raise TrainConfigError(f"{problem}, or use another --output_dir")


def find_resume_point(cfg: TrainConfig, acc):
    """The checkpoint --resume names (a LoadedCheckpoint), or None to start from scratch."""
    from prefixcap.train.checkpoint import has_checkpoint, load_checkpoint

    path = resume_path(cfg)
    if path is None:
        return None
    if has_checkpoint(path):
        return load_checkpoint(path)
    if cfg.resume != "latest":
        raise TrainConfigError(f"--resume {cfg.resume}: not a training checkpoint folder")
    acc.print(f"prefixcap train: --resume: no checkpoint at {path} yet; starting from scratch")
    return None


def check_resume(resume_from, now: dict[str, Any], config) -> None:
    """Refuse a checkpoint written with other training settings (now: this run's) or another model (config)."""
    saved = resume_from.run_config
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in _RESUME_KEYS
             if k in saved and saved.get(k) != now.get(k)]
    saved_model = json.loads((resume_from.path / "config.json").read_text())
    new_model = config.to_dict()
    diffs += [f"{k}: checkpoint {saved_model.get(k)!r}, now {new_model.get(k)!r}" for k in _MODEL_KEYS
              if saved_model.get(k) != new_model.get(k)]
    if diffs:
        raise TrainConfigError(
            f"--resume: {resume_from.path} was written by a run with other settings ("
            + "; ".join(diffs) + "); resume with the same settings or use another --output_dir")


def restore_state(cfg: TrainConfig, acc, resume_from, optimizer, scheduler, is_deepspeed: bool):
    """The TrainingState to start from; on resume: optimizer, scheduler and (main process) RNG states restored."""
    from prefixcap.train.checkpoint import TrainingState, restore_rng_states

    if resume_from is None:
        return TrainingState()
    payload = resume_from.payload
    if is_deepspeed and resume_from.deepspeed_dir.is_dir():
        acc.load_state(str(resume_from.deepspeed_dir))
    elif "optimizer" in payload:
        optimizer.optimizer.load_state_dict(payload["optimizer"])
    else:  # an epoch checkpoint: optimizer state is kept in {prefix}_latest.ckpt only
        acc.print(f"prefixcap train: notice: {resume_from.path} holds no optimizer state (only "
                  f"{cfg.output_filename_prefix}_latest.ckpt does); continuing with fresh AdamW "
                  "moments, so the run will not match an uninterrupted one exactly")
    scheduler.load_state_dict(payload["scheduler"])
    lr_from_this_schedule(optimizer, scheduler)
    if acc.is_main_process:
        restore_rng_states(payload["rng"])
    return resume_from.state


def lr_from_this_schedule(optimizer, scheduler) -> None:
    """Set the LR this run's schedule gives at the restored step.

    The restored optimizer holds the LR of the run that saved it; a resumed run with a larger --epochs
    or --max_steps has a longer schedule, and its next step would otherwise use the old one's last LR
    (0 once that schedule ended). The same expression as LambdaLR's, so an unchanged schedule gives
    the very same value and resume stays bit-identical.
    """
    lrs = [base * fn(scheduler.last_epoch)
           for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (progress bar, tracker)
