"""The preprocess stage's library: encode images with CLIP and tokenize captions into shards.

`run_preprocess(PreprocessConfig(...))` runs this process's rank and returns a PreprocessSummary;
`prefixcap preprocess` / the seed's `create_dataset.py` (prefixcap.preprocess.cli) is its command line.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from prefixcap.data.images import DEFAULT_MAX_IMAGE_PIXELS
from prefixcap.data.readers import InputError, ReaderConfig, ReaderOptions, make_reader
from prefixcap.data.shards import FORMAT_VERSION, Manifest
from prefixcap.devices import resolve_device
from prefixcap.model.hub import local_or_name
from prefixcap.runs import rank_and_world

if TYPE_CHECKING:
    from prefixcap.preprocess.progress import PreprocessSummary

logger = logging.getLogger(__name__)

PROG = "prefixcap preprocess"


@dataclass
class PreprocessConfig:
    """Every option of the preprocess stage (the seed's create_dataset.py flags plus prefixcap's)."""

    input_dataset: list[str] = field(default_factory=list)
    output_folder: str = "./preprocessed_dataset/"
    input_format: str = "files"
    reader: ReaderOptions = field(default_factory=ReaderOptions)  # --wds_*, --image_column, --coco_split, ...
    batch_size: int = 256
    num_prepro_workers: int = 8
    subset_size: int | None = None
    clip_model: str = "ViT-B/32"
    tokenizer_model_type: str = "gpt2"
    tokenizer_model_variant: str = "gpt2-xl"
    max_token_length: int = 128
    prefix_length: int = 10
    device: str = "cuda:0"
    # prefixcap's additions
    samples_per_shard: int = 10000
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    jpeg_draft: bool = False
    progress: bool = True
    overwrite: bool = False  # delete the folder's previous dataset (settings, shards, manifest) first
    store_patch_tokens: bool = False  # also store the encoder's final patch tokens (prefixcap.model.patch_tokens)
    patch_pool: int = 1  # P x P average pooling of the stored patch grid (CLS kept)
    text_only: bool = False  # one CLIP text embedding per caption instead of image embeddings (preprocess.text)

    def __post_init__(self) -> None:
        # Local folders are recorded resolved (settings, manifest): the dataset then trains from any folder.
        self.clip_model = local_or_name(self.clip_model)
        self.tokenizer_model_variant = local_or_name(self.tokenizer_model_variant)


def clear_output(folder: str) -> int:
    """--overwrite: delete what preprocess wrote into folder (never other files); returns the entries deleted."""
    import shutil
    from pathlib import Path

    from prefixcap.data.shards import MANIFEST, SETTINGS, SHARD_DIR
    from prefixcap.preprocess.progress import PROGRESS_DIR

    removed = 0
    for name in (MANIFEST, SETTINGS, SHARD_DIR, PROGRESS_DIR):
        path = Path(folder) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed += 1
    return removed


def run_preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    """Library entry point: validate, load the tokenizer and encoder, run this rank; returns its PreprocessSummary
    (with the manifest once every rank is done)."""
    from prefixcap import __version__
    from prefixcap.preprocess.runner import RunConfig, Runner
    from prefixcap.model.language_models import family_of_type, load_tokenizer, tokenizer_fingerprint

    rank, world = rank_and_world()
    if not cfg.progress:  # --no_progress hides the weight-loading bars of transformers too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if cfg.overwrite and world > 1:
        raise InputError("--overwrite deletes the folder the other ranks are writing: run it once without a "
                         "launcher, or delete the folder, then launch the ranks without --overwrite")
    reader_cfg = ReaderConfig(list(cfg.input_dataset), cfg.input_format, cfg.reader, cfg.samples_per_shard)
    reader = _open_reader(cfg, reader_cfg)  # fails at once on a bad path / column / format
    family = family_of_type(cfg.tokenizer_model_type, cfg.tokenizer_model_variant)
    tokenizer = load_tokenizer(cfg.tokenizer_model_variant)
    encoder = None
    if cfg.input_format == "embeddings":
        from prefixcap.model.encoders import resolve_encoder

        resolve_encoder(cfg.clip_model)  # validated, recorded; the embeddings are already computed
        encoder_name, embedding_dim = cfg.clip_model, int(reader.dim)
    else:
        from prefixcap.model.encoders import load_encoder

        device = resolve_device(cfg.device, PROG)
        encoder = load_encoder(cfg.clip_model, device=device)
        encoder_name, embedding_dim = encoder.spec.name, int(encoder.embedding_dim)

    patch_record = _patch_token_record(cfg, encoder)
    units = reader.units()
    fingerprint = tokenizer_fingerprint(tokenizer)
    settings = {
        "format_version": FORMAT_VERSION,
        "clip_model": cfg.clip_model, "encoder": encoder_name, "embedding_dim": embedding_dim,
        "tokenizer": cfg.tokenizer_model_variant, "tokenizer_model_type": cfg.tokenizer_model_type,
        "lm_family": family, "tokenizer_fingerprint": fingerprint,
        "max_token_length": cfg.max_token_length, "prefix_length": cfg.prefix_length,
        "input_format": cfg.input_format, "num_input_units": len(units),
        "input_units_sha256": hashlib.sha256("\n".join(units).encode()).hexdigest(),
        "samples_per_shard": cfg.samples_per_shard, "subset_size": cfg.subset_size,
        # Everything that changes which samples are read and how (the cache folder does not).
        "reader": {k: v for k, v in asdict(cfg.reader).items() if k != "cache_path"},
        "max_image_pixels": cfg.max_image_pixels, "jpeg_draft": cfg.jpeg_draft,
    }
    if patch_record:  # absent otherwise, so folders written before the option resume unchanged
        settings.update(store_patch_tokens=True, patch_pool=cfg.patch_pool)
    text_record = _text_only_record(cfg, encoder)
    if text_record:  # absent otherwise, likewise
        settings["text_only"] = True
    header = Manifest(
        clip_model=cfg.clip_model, embedding_dim=embedding_dim, tokenizer=cfg.tokenizer_model_variant,
        lm_family=family, tokenizer_fingerprint=fingerprint, max_token_length=cfg.max_token_length,
        prefix_length=cfg.prefix_length, input_format=cfg.input_format,
        hub_datasets=list(getattr(reader, "hub_datasets", None) or []), patch_tokens=patch_record or None,
        text_only=text_record,
        created_by=f"prefixcap {__version__} preprocess", created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    run_cfg = RunConfig(
        output_folder=cfg.output_folder, batch_size=cfg.batch_size, num_prepro_workers=cfg.num_prepro_workers,
        samples_per_shard=cfg.samples_per_shard, subset_size=cfg.subset_size, max_image_pixels=cfg.max_image_pixels,
        jpeg_draft=cfg.jpeg_draft, rank=rank, world_size=world, progress=cfg.progress,
        patch_pool=cfg.patch_pool if patch_record else None, text_only=cfg.text_only,
    )
    from prefixcap.locking import output_lock

    # Each rank locks its own file: the ranks of one run write the folder together (disjoint units),
    # while the same rank of a second run (and any single-process run, rank 0) is refused.
    with output_lock(cfg.output_folder, PROG, rank=rank, flag="--output_folder"):
        if cfg.overwrite and clear_output(cfg.output_folder):
            logger.warning(f"{PROG}: --overwrite: deleted the previous dataset in {cfg.output_folder}")
        return Runner(run_cfg, reader, tokenizer, family, cfg.max_token_length, encoder, settings=settings,
                      manifest_header=header).run()


def _open_reader(cfg: PreprocessConfig, reader_cfg: ReaderConfig) -> Any:
    """The input's reader; with --text_only, one caption per record and no image read (data.text_only)."""
    if not cfg.text_only:
        if cfg.input_format == "text":
            raise InputError("--input_format text holds captions only (one per line): add --text_only")
        return make_reader(reader_cfg)
    from prefixcap.data.text_only import make_text_reader
    from prefixcap.preprocess.text import refuse_image_options

    refuse_image_options(cfg.store_patch_tokens, cfg.patch_pool)
    return make_text_reader(reader_cfg)


def _text_only_record(cfg: PreprocessConfig, encoder: Any) -> dict[str, Any] | None:
    """The manifest's "text_only" record (what the embeddings are), or None for image embeddings."""
    if not cfg.text_only:
        return None
    from prefixcap.preprocess.text import text_only_record

    return text_only_record(encoder)


def _patch_token_record(cfg: PreprocessConfig, encoder: Any) -> dict[str, Any] | None:
    """The manifest's "patch_tokens" record (tokens per image, width, pooling), or None without the option."""
    if not cfg.store_patch_tokens:
        if cfg.patch_pool != 1:
            raise InputError(f"--patch_pool {cfg.patch_pool} pools stored patch tokens: add --store_patch_tokens")
        return None
    if encoder is None:
        raise InputError("--store_patch_tokens needs images: --input_format embeddings holds pooled vectors only")
    from prefixcap.model.patch_tokens import TOKEN_SOURCE, PatchTokensUnsupportedError

    shape = getattr(encoder, "patch_token_shape", None)
    try:
        if shape is None:
            raise PatchTokensUnsupportedError(f"{type(encoder).__name__} does not expose patch tokens")
        n, c = shape(cfg.patch_pool)
    except PatchTokensUnsupportedError as err:
        raise InputError(f"--store_patch_tokens with --clip_model {cfg.clip_model}: {err}") from err
    return {"num_tokens": int(n), "dim": int(c), "pool": cfg.patch_pool, "dtype": "float16", "source": TOKEN_SOURCE}
