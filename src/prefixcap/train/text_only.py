"""What training on a text-only dataset (preprocess --text_only) changes: CapDec noise, normalisation, refusals.

A text-only dataset holds one CLIP text embedding per caption. Its captioner must read image
embeddings later, so training normalises the embeddings (as captioning will) and adds CapDec's
Gaussian noise (variance 0.016 unless --noise_variance says otherwise; model.noise). The artifact
records both (CaptionConfig.trained_on, noise_variance, normalize_prefix), so captioning images
needs no flag.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefixcap.data.shards import MANIFEST, Manifest
from prefixcap.model.noise import CAPDEC_VARIANCE
from prefixcap.train.config import TrainConfig, TrainConfigError, mapper_features

logger = logging.getLogger(__name__)


def refuse_image_flags(cfg: TrainConfig) -> None:
    """A text-only --data_dir with a flag that needs images (a patch-token mapper) is refused in one line."""
    path = Path(cfg.data_dir) / MANIFEST
    if not path.is_file() or mapper_features(cfg) != "patch_tokens":
        return
    try:
        text_only = Manifest.read(cfg.data_dir).text_only
    except ValueError:
        return  # the dataset loader reports a damaged manifest
    if text_only:
        raise TrainConfigError(f"--mapping_type {cfg.mapping_type} reads image patch tokens, but --data_dir "
                               f"{cfg.data_dir} is text-only (one CLIP text embedding per caption); use "
                               "--mapping_type mlp or transformer")


def embedding_settings(cfg: TrainConfig, manifest: Manifest) -> tuple[bool, str, float]:
    """(normalize_prefix, trained_on, noise_variance) of the run, with a notice for each default it fills in."""
    text = bool(manifest.text_only)
    noise = cfg.noise_variance
    if noise is None:
        noise = CAPDEC_VARIANCE if text else 0.0
        if text:
            logger.warning(f"prefixcap train: notice: {cfg.data_dir} is text-only: training adds CapDec noise of "
                           f"variance {CAPDEC_VARIANCE} to the normalised embeddings (--noise_variance V to change, "
                           "0 for none)")
    normalize = cfg.normalize_prefix
    if (text or noise) and not normalize:
        normalize = True
        why = "the dataset is text-only" if text else f"--noise_variance {noise} is defined on unit-norm embeddings"
        logger.warning(f"prefixcap train: notice: --normalize_prefix on ({why}); images are normalised the "
                       "same way when captioned")
    return normalize, ("text" if text else "image"), float(noise)
