"""The data a training run reads: the dataset, its validation split (by image) and the batch loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefixcap.train.config import TrainConfig, TrainConfigError, mapper_features

if TYPE_CHECKING:  # the data stack is imported only when a run starts
    from prefixcap.data.shards import Manifest


@dataclass
class Loaders:
    """The training and validation data of a run, and the loaders that batch them."""

    data: Any  # CaptionDataset of --data_dir
    val_data: Any  # the CaptionDataset validation captions come from (data itself under --val_fraction)
    train_idx: Any  # (N_train,) int64 caption indices into data
    val_idx: Any  # (N_val,) int64 caption indices into val_data
    sampler: Any  # LengthGroupedBatchSampler over train_idx (this process's share)
    loader: Any
    val_loader: Any | None  # None without validation captions


def check_data_dir(cfg: TrainConfig) -> None:
    folder = Path(cfg.data_dir)
    if not folder.exists():
        raise TrainConfigError(f"--data_dir {cfg.data_dir}: the folder does not exist (write one with "
                               "prefixcap preprocess --output_folder ...)")
    if not folder.is_dir():
        raise TrainConfigError(f"--data_dir {cfg.data_dir}: not a folder (expected a preprocessed dataset folder)")
    started = any((folder / name).exists() for name in ("manifest.json", "settings.json", "shards"))
    if not started:  # raw input (tars, images), not something preprocess began to write
        tars = len(list(folder.glob("*.tar")))
        holds = f"it holds {tars} .tar file(s), " if tars else ""
        raise TrainConfigError(f"--data_dir {cfg.data_dir} is not a preprocessed dataset folder ({holds}no "
                               "manifest.json): make one with prefixcap preprocess --input_dataset "
                               f"{cfg.data_dir} --output_folder DATA (or python3 create_dataset.py ...), "
                               "then train with --data_dir DATA")


def check_validation_flags(cfg: TrainConfig) -> None:
    if cfg.val_fraction and cfg.val_data_dir:
        raise TrainConfigError("give either --val_fraction or --val_data_dir, not both")
    if not 0 <= cfg.val_fraction < 1:
        raise TrainConfigError(f"--val_fraction must be in [0, 1), got {cfg.val_fraction}")


def open_data(cfg: TrainConfig):
    """The CaptionDataset of --data_dir, reading what the mapper needs."""
    from prefixcap.data.loader import CaptionDataset

    from prefixcap.train.text_only import refuse_image_flags

    check_data_dir(cfg)
    refuse_image_flags(cfg)
    try:
        data = CaptionDataset(cfg.data_dir, features=mapper_features(cfg))
    except (FileNotFoundError, ValueError) as err:  # ValueError: a token mapper on a dataset without tokens
        raise TrainConfigError(f"--data_dir {cfg.data_dir}: {err}") from err
    return _with_retrieval(cfg, data, "train")


def _with_retrieval(cfg: TrainConfig, data, subfolder: str):
    """With --datastore: the dataset whose samples carry their image's retrieval prompt (computed once)."""
    if not cfg.datastore:
        return data
    from prefixcap.retrieval.training import with_retrieval

    return with_retrieval(data, cfg.datastore, cfg.retrieval_k, cfg.output_dir, subfolder=subfolder)


def build_loaders(cfg: TrainConfig, data, lengths, cpu: bool, world: int, rank: int) -> Loaders:
    """Validation split (by image), samplers and loaders of this process (rank of world)."""
    import numpy as np

    from prefixcap.data.loader import (
        CaptionDataset,
        LengthGroupedBatchSampler,
        SequentialBatchSampler,
        make_loader,
        split_by_image,
    )

    try:
        train_idx, val_idx = split_by_image(data.data, cfg.val_fraction, cfg.seed)
    except ValueError as err:  # e.g. a fraction that leaves no training image
        raise TrainConfigError(f"{err} (the dataset {cfg.data_dir} has {data.data.num_images} images)") \
            from err
    val_data = data
    if cfg.val_data_dir:
        try:
            val_data = CaptionDataset(cfg.val_data_dir, features=mapper_features(cfg))
        except (FileNotFoundError, ValueError) as err:
            raise TrainConfigError(f"--val_data_dir {cfg.val_data_dir}: {err}") from err
        _check_val_manifest(cfg, val_data.manifest, data.manifest)
        val_data = _with_retrieval(cfg, val_data, "val")
        val_idx = np.arange(len(val_data), dtype=np.int64)
    sampler = LengthGroupedBatchSampler(train_idx, lengths[train_idx], cfg.batch_size, seed=cfg.seed,
                                        num_replicas=world, rank=rank, group_by_length=cfg.group_by_length)
    pin = not cpu
    loader = make_loader(data, sampler, cfg.num_workers, pin, cfg.seed)
    val_loader = None
    if len(val_idx):
        val_lengths = (val_data.data.lengths() if cfg.val_data_dir else lengths)[val_idx]
        vs = SequentialBatchSampler(val_idx, val_lengths, cfg.batch_size, world, rank)
        val_loader = make_loader(val_data, vs, min(cfg.num_workers, 2), pin, cfg.seed)
    return Loaders(data=data, val_data=val_data, train_idx=train_idx, val_idx=val_idx, sampler=sampler,
                   loader=loader, val_loader=val_loader)


def _check_val_manifest(cfg: TrainConfig, val: Manifest, train: Manifest) -> None:
    for key in ("embedding_dim", "clip_model", "tokenizer_fingerprint", "lm_family"):
        mine, theirs = getattr(val, key), getattr(train, key)
        if mine is not None and theirs is not None and mine != theirs:
            raise TrainConfigError(f"--val_data_dir {cfg.val_data_dir}: its {key} ({mine}) differs "
                                   f"from --data_dir {cfg.data_dir}'s ({theirs})")
