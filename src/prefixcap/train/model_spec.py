"""Which model a training run builds, from its flags and the dataset's manifest; contradictions are refused.

`resolve_model` picks the LM and tokenizer (checked against the ones the captions were tokenized
with), the mapper's shape (K, C, token input) and the LoRA settings; `card_info` is what the model
card says about the training data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefixcap.data.shards import Manifest
from prefixcap.errors import first_line
from prefixcap.model.hub import local_or_name
from prefixcap.train.config import TrainConfig, TrainConfigError

logger = logging.getLogger(__name__)

# Of the Hugging Face keyword arguments (prefixcap.train.config.HF_KWARGS), those a tokenizer also accepts.
_TOKENIZER_KWARGS = ("cache_dir", "revision", "token", "trust_remote_code", "local_files_only", "force_download")


def resolve_model(cfg: TrainConfig, manifest: Manifest, embedding_dim: int, max_caption_tokens: int):
    """Build (CaptionConfig, lm, tokenizer), refusing settings that contradict the dataset."""
    from prefixcap.model.language_models import LanguageModelError, load_language_model
    from prefixcap.model.config import CaptionConfig
    from prefixcap.train.text_only import embedding_settings

    where = f"the dataset {cfg.data_dir}"
    dim = int(manifest.embedding_dim or embedding_dim)
    if cfg.prefix_size is not None and cfg.prefix_size != dim:
        raise TrainConfigError(
            f"--prefix_size {cfg.prefix_size} conflicts with {where}: its CLIP embeddings "
            f"({manifest.clip_model}) are {dim}-d; omit --prefix_size or pass {dim}")
    if manifest.normalized and not cfg.normalize_prefix:
        # clip-retrieval embeddings are unit-norm, while captioning images later embeds them raw.
        logger.warning("notice: the dataset's embeddings are L2-normalised but --normalize_prefix is off; images "
                       "captioned with this model will not be normalised the same way (pass --normalize_prefix)")
    data_k = manifest.prefix_length
    if cfg.prefix_length is not None and data_k is not None and cfg.prefix_length != int(data_k):
        # The shards hold embeddings and tokens only; K is the mapper's, so the seed's own README
        # (preprocess with 10, train with 40) must work. The manifest's K is only the default.
        logger.warning(f"prefixcap train: notice: --prefix_length {cfg.prefix_length} (the dataset was "
                       f"preprocessed with {data_k}, which is only the default; the shards do not depend on it)")
    k = cfg.prefix_length or (int(data_k) if data_k is not None else 10)

    name, flag, family, tokenizer = _language_model_and_tokenizer(cfg, manifest, where)
    try:
        lm = load_language_model(name, family, **cfg.hf_kwargs)
    except LanguageModelError as err:
        raise TrainConfigError(f"{flag} {name}: {err}") from err
    except ImportError as err:  # e.g. --attn_implementation flash_attention_2 without flash_attn
        raise TrainConfigError(f"{flag} {name}: {first_line(err)}") from err
    max_pos = getattr(lm.config, "max_position_embeddings", None) if family == "causal" else None
    if max_pos and k + max_caption_tokens > max_pos:
        raise TrainConfigError(
            f"--prefix_length {k} + the longest caption of {where} ({max_caption_tokens} tokens) exceeds "
            f"{name}'s {max_pos} positions; use a shorter prefix or preprocess with a smaller --max_token_length")
    mapping = _mapping_config(cfg, manifest, where, name, dim, k, lm)
    normalize, trained_on, noise = embedding_settings(cfg, manifest)  # text-only: CapDec noise (train.text_only)
    config = CaptionConfig(
        clip_model=local_or_name(str(manifest.clip_model)), language_model=name, lm_family=family,
        tokenizer=local_or_name(manifest.tokenizer) or name, mapping=mapping,
        normalize_prefix=normalize, only_prefix=cfg.only_prefix, trained_on=trained_on, noise_variance=noise,
        max_token_length=int(manifest.max_token_length or max_caption_tokens))
    config.lora = lora_settings(cfg, lm)
    if cfg.datastore:  # retrieval-augmented: the artifact records k, the prompt format and its datastore
        from prefixcap.retrieval.training import settings as retrieval_settings

        config.retrieval = retrieval_settings(cfg.datastore, cfg.retrieval_k)
    return config, lm, tokenizer


def _language_model_and_tokenizer(cfg: TrainConfig, manifest: Manifest, where: str):
    """(LM name, the flag that named it, its family, its tokenizer), checked against the dataset's tokenizer."""
    from prefixcap.model.language_models import (
        LanguageModelError,
        detect_family,
        family_of_type,
        load_tokenizer,
        tokenizer_fingerprint,
    )

    data_tok = manifest.tokenizer
    name = local_or_name(cfg.language_model or cfg.language_model_variant or data_tok or "gpt2-xl")
    flag = ("--language_model" if cfg.language_model else "--language_model_variant" if cfg.language_model_variant
            else "the dataset's tokenizer (its manifest.json; choose another with --language_model)" if data_tok
            else "--language_model_variant")
    tok_kwargs = {k_: v for k_, v in cfg.hf_kwargs.items() if k_ in _TOKENIZER_KWARGS}
    try:
        if cfg.language_model_type:
            family = family_of_type(cfg.language_model_type, name, **tok_kwargs)
        elif name == local_or_name(data_tok) and manifest.lm_family:
            family = manifest.lm_family
        else:
            family = detect_family(name, **tok_kwargs)
        tokenizer = load_tokenizer(name, **tok_kwargs)
    except LanguageModelError as err:
        raise TrainConfigError(f"{flag} {name}: {err}") from err
    data_family = manifest.lm_family
    if data_family and family != data_family:
        raise TrainConfigError(
            f"{flag} {name} is a {family} LM but {where} was tokenized for a {data_family} LM "
            f"({data_tok}); captions are framed differently for the two, so preprocess again for {name}")
    expected = manifest.tokenizer_fingerprint
    if expected is None and data_tok and data_tok != name:
        try:
            expected = tokenizer_fingerprint(load_tokenizer(data_tok, **tok_kwargs))
        except LanguageModelError:
            logger.warning(f"prefixcap train: notice: cannot load the dataset's tokenizer {data_tok!r} to check it "
                           f"matches {name!r}; continuing unchecked")
    actual = tokenizer_fingerprint(tokenizer)
    if expected is not None and {k_: expected.get(k_) for k_ in actual} != actual:
        raise TrainConfigError(
            f"{flag} {name} has a different tokenizer ({actual}) from the one {where} was tokenized with "
            f"({data_tok}: {expected}); train with --language_model {data_tok} or preprocess the data again "
            f"with --tokenizer_model_variant {name}")
    return name, flag, family, tokenizer


def _mapping_config(cfg: TrainConfig, manifest: Manifest, where: str, name: str, dim: int, k: int, lm):
    """The mapper's shape: flags, the dataset's embedding width (or patch tokens) and the LM's width."""
    from prefixcap.model.mapping import MappingConfig, with_token_input

    mapping = MappingConfig(
        mapping_type=cfg.mapping_type, prefix_size=dim, lm_dim=int(lm.get_input_embeddings().embedding_dim),
        prefix_length=k, clip_length=cfg.clip_prefix_length, num_layers=cfg.num_layers,
        num_heads=cfg.num_attention_heads)
    try:  # token mappers: N tokens and their pooling from the manifest (the projector's K is N)
        mapping = with_token_input(mapping, manifest.patch_tokens, where)
    except ValueError as err:
        raise TrainConfigError(str(err)) from err
    if mapping.mapping_type in ("transformer", "transformer_tokens") and mapping.lm_dim % mapping.num_heads:
        raise TrainConfigError(f"--num_attention_heads {cfg.num_attention_heads} does not divide {name}'s "
                               f"width {mapping.lm_dim}")
    return mapping


def lora_settings(cfg: TrainConfig, lm):
    """--lora_* flags -> LoraSettings (None without --lora_rank); refuses contradictory flags."""
    from prefixcap.model.adapters import AdapterError, resolve_settings

    if not cfg.lora_rank:
        if cfg.merge_lora:
            raise TrainConfigError("--merge_lora merges a LoRA adapter: it needs --lora_rank")
        return None
    if cfg.only_prefix:
        raise TrainConfigError("--lora_rank trains adapters inside the LM, --only_prefix freezes it: give one of them")
    targets = [t.strip() for t in (cfg.lora_target_modules or "").split(",") if t.strip()]
    try:
        return resolve_settings(lm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets or None)
    except AdapterError as err:
        raise TrainConfigError(str(err)) from err


def card_info(cfg: TrainConfig, manifest: Manifest, num_train_captions: int) -> dict[str, Any]:
    """What the model card says about the training data (from the dataset's manifest)."""
    data = {"data_dir": Path(cfg.data_dir).name, "input_format": manifest.input_format,
            "num_images": manifest.num_images, "num_captions": manifest.num_captions,
            "num_train_captions": num_train_captions, "clip_model": manifest.clip_model,
            "datasets": list(manifest.hub_datasets)}
    return {"training_data": {k: v for k, v in data.items() if v not in (None, [])}}
