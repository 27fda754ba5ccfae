"""The captioning model: mapper + language model, the caption loss, and the self-describing artifact.

Artifact layout (a folder; `{prefix}_latest.ckpt` checkpoints are such folders):
  config.json            CaptionConfig (+ "artifact": "prefixcap") -- enough to rebuild everything
  mapper.safetensors     the mapping network
  tokenizer/             the LM tokenizer (always stored: small, and it pins the token ids)
  lm/                    the LM weights, only when the LM was fine-tuned (or a LoRA adapter merged);
                         otherwise the LM is referenced by `language_model` (hub id or local folder)
  lm_adapter/            a LoRA adapter (PEFT's adapter_config.json + adapter_model.safetensors), applied
                         to the referenced LM on load; only LoRA-trained models have it
  README.md              the model card (Hub metadata header + config, training data, last evaluation),
  model_card.json        rendered from the facts in model_card.json and config.json
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from prefixcap.model.adapters import ADAPTER_DIR, attach_lora, lora_parameters, merged_copy
from prefixcap.model.card import CARD_DATA, render_card
from prefixcap.model.config import CaptionConfig
from prefixcap.model.encoders import normalize
from prefixcap.model.noise import add_noise
from prefixcap.model.language_models import load_language_model, load_tokenizer
from prefixcap.model.mapping import build_mapper

CONFIG_NAME = "config.json"
MAPPER_WEIGHTS = "mapper.safetensors"


def _lm_width(lm: nn.Module) -> int:
    return int(lm.get_input_embeddings().embedding_dim)


def _needs_full_logits(lm: nn.Module) -> bool:
    # Some LMs post-process logits (soft-capping, scaling) inside forward; the hidden-state fast
    # path below would skip that, so they go through the model's own forward instead.
    cfg = lm.config
    return bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))


class CaptionModel(nn.Module):
    """Mapper + LM. `forward(embeddings, tokens, mask)` returns the mean caption-token loss."""

    def __init__(self, config: CaptionConfig, lm: nn.Module | None = None, tokenizer=None,
                 adapter_path: str | Path | None = None, **hf_kwargs: Any):
        super().__init__()
        self.config = config
        if config.lora is not None and config.only_prefix:
            raise ValueError("LoRA trains adapters inside the LM, so it cannot be combined with a frozen LM "
                             "(only_prefix / --only_prefix)")
        if lm is None:
            lm = load_language_model(config.language_model, config.lm_family, **hf_kwargs)
        # Kept out of the module tree (plain attribute): the PeftModel wraps the very `lm` below, and
        # registering both would list every LM weight twice in state_dict().
        self.__dict__["peft_wrapper"] = None
        if config.lora is not None:
            self.__dict__["peft_wrapper"] = attach_lora(lm, config.lora, adapter_path)
        self.lm = lm
        self.gradient_checkpointing = False
        self.card_info: dict[str, Any] = {}  # training data / evaluation facts for the model card
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
            config.tokenizer or config.language_model, **hf_kwargs)
        width = _lm_width(lm)
        if config.mapping.lm_dim != width:
            config.mapping.lm_dim = width  # the LM decides D; the config records it
        self.mapper = build_mapper(config.mapping)
        self.set_only_prefix(config.only_prefix)

    # --- training mode -------------------------------------------------------------------
    def set_only_prefix(self, only_prefix: bool) -> None:
        """Freeze (no weight gradients at all, eval mode) or unfreeze the LM (with LoRA: only its adapters)."""
        self.config.only_prefix = only_prefix
        self.lm.requires_grad_(not only_prefix and self.config.lora is None)
        if self.config.lora is not None and not only_prefix:
            for p in lora_parameters(self.lm):
                p.requires_grad_(True)
        if only_prefix:
            self.lm.eval()

    def train(self, mode: bool = True) -> "CaptionModel":
        super().train(mode)
        if self.config.only_prefix:
            self.lm.eval()  # a frozen LM never runs dropout
            if self.gradient_checkpointing:
                # transformers checkpoints a layer only while that layer is in training mode; flag just the
                # layer blocks (their dropout and attention submodules stay in eval mode: no dropout).
                for block in _checkpointed_layers(self.lm):
                    block.training = mode
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LM's layer activations in the backward pass instead of storing them.

        Non-reentrant checkpointing: gradients reach the prefix (and LoRA/LM weights) whether or not the
        LM's own inputs or weights require grad, so a frozen LM needs no enable_input_require_grads.
        """
        enable = getattr(self.lm, "activation_checkpointing_enable", None) or self.lm.gradient_checkpointing_enable
        if not getattr(self.lm, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.lm).__name__} does not support gradient checkpointing")
        enable({"use_reentrant": False})
        self.gradient_checkpointing = True
        self.train(self.training)

    # --- the forward pass ----------------------------------------------------------------
    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings (B, C) -> prefix embeddings (B, K, D) in the LM's dtype."""
        embeddings = embeddings.float()
        if self.config.normalize_prefix:
            embeddings = normalize(embeddings)
        if self.training and self.config.noise_variance:  # CapDec: training only, never at inference
            embeddings = add_noise(embeddings, self.config.noise_variance)
        mapper_dtype = next(self.mapper.parameters()).dtype
        prefix = self.mapper(embeddings.to(mapper_dtype))  # (B, K, D)
        return prefix.to(self.lm.get_input_embeddings().weight.dtype)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                target_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over real caption tokens (mask==1); prefix and padding excluded.

        embeddings (B, C), tokens (B, T) right-padded, mask (B, T) 1 for real tokens. target_mask (B, T)
        (causal LMs; retrieval's prompt, prefixcap.retrieval.prompt.prompted_targets): the LM attends to
        every mask==1 token but the loss is taken only where target_mask==1 (the prompt is context).
        """
        prefix = self.prefix(embeddings)  # (B, K, D)
        if self.config.lm_family == "seq2seq":
            if target_mask is not None:
                raise ValueError("a retrieval prompt (target_mask) needs a causal LM")
            return self._seq2seq_loss(prefix, tokens, mask)
        return self._causal_loss(prefix, tokens, mask, target_mask)

    def _causal_loss(self, prefix: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                     target_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, k, _ = prefix.shape
        t = tokens.shape[1]
        token_embeds = self.lm.get_input_embeddings()(tokens)  # (B, T, D)
        inputs = torch.cat((prefix, token_embeds), dim=1)  # (B, K+T, D)
        attn = torch.cat((mask.new_ones(b, k), mask), dim=1)  # (B, K+T)
        # The hidden state at position K-1+i predicts caption token i.
        targets_mask = (mask if target_mask is None else target_mask * mask).bool()  # (B, T)
        if _needs_full_logits(self.lm):
            logits = self.lm(inputs_embeds=inputs, attention_mask=attn, logits_to_keep=t + 1, use_cache=False).logits
            logits = logits[:, :t][targets_mask]  # (N, V)
        else:
            # Only the base transformer runs on all positions; the LM head (the largest matmul
            # for small LMs) runs only on the real caption positions, not on prefix or padding.
            hidden = self.lm.base_model(inputs_embeds=inputs, attention_mask=attn, use_cache=False).last_hidden_state
            hidden = hidden[:, k - 1:k - 1 + t][targets_mask]  # (N, D)
            logits = self.lm.get_output_embeddings()(hidden)  # (N, V)
        return F.cross_entropy(logits.float(), tokens[targets_mask])

    def _seq2seq_loss(self, prefix: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The encoder sees only the prefix; the caption is the decoder's target (never encoder input).
        enc_mask = torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device)  # (B, K)
        labels = tokens.masked_fill(mask == 0, -100)  # (B, T)
        out = self.lm(inputs_embeds=prefix, attention_mask=enc_mask, labels=labels)
        return out.loss

    # --- save / load ---------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, merge_lora: bool = False) -> Path:
        """Write the artifact atomically: a crash mid-save leaves any previous artifact loadable.

        Frozen LM: no LM weights; LoRA: only the adapter (lm_adapter/), or with merge_lora the LM with
        the adapter merged into its weights (lm/, loads as a fine-tuned model); fine-tuned: lm/.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            mapper_state = {k: v.detach().contiguous().cpu() for k, v in self.mapper.state_dict().items()}
            save_file(mapper_state, tmp / MAPPER_WEIGHTS, metadata={"format": "pt"})
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            config_obj = self.config
            if self.peft_wrapper is not None and merge_lora:
                merged_copy(self.peft_wrapper).save_pretrained(tmp / "lm")
                config_obj = replace(self.config, lora=None)
            elif self.peft_wrapper is not None:
                self.peft_wrapper.save_pretrained(tmp / ADAPTER_DIR)
                (tmp / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's stub card; ours is at the top
            elif not self.config.only_prefix:
                self.lm.save_pretrained(tmp / "lm")
            config = config_obj.to_dict()
            config["language_model"] = _portable_reference(self.config.language_model)
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            (tmp / CARD_DATA).write_text(json.dumps(self.card_info, indent=2, default=str) + "\n")
            (tmp / "README.md").write_text(render_card(config_obj, self.card_info))
            _swap_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **hf_kwargs: Any) -> "CaptionModel":
        """Load an artifact folder (or a Hub repo id) with no other argument needed."""
        folder = resolve_artifact(path, **hf_kwargs)
        config = CaptionConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        tokenizer = load_tokenizer(str(folder / "tokenizer"))
        has_lm = (folder / "lm").is_dir()
        if config.lm_mode == "fine-tuned" and not has_lm:
            # Falling back to the base LM by name would caption (or resume training) with weights this
            # model was never trained with, silently.
            raise FileNotFoundError(f"{folder} holds a model whose LM was fine-tuned, but its lm/ folder is "
                                    "missing; copy the whole artifact folder")
        lm_source = str(folder / "lm") if has_lm else config.language_model
        lm = load_language_model(lm_source, config.lm_family, dtype=dtype, **hf_kwargs)
        adapter = None
        if config.lora is not None:
            adapter = folder / ADAPTER_DIR
            if not (adapter / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{folder} is a LoRA-trained model but {ADAPTER_DIR}/adapter_config.json "
                                        "is missing")
        model = cls(config, lm=lm, tokenizer=tokenizer, adapter_path=adapter)
        state = load_file(folder / MAPPER_WEIGHTS)
        model.mapper.load_state_dict(state)
        if (folder / CARD_DATA).is_file():
            model.card_info = json.loads((folder / CARD_DATA).read_text())
        if dtype is not None:
            model.mapper.to(dtype)
        if device is not None:
            model.to(device)
        return model.eval()

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    merge_lora: bool = False) -> str:
        """Upload the artifact folder (with its model card) to the Hugging Face Hub with the standard client."""
        from prefixcap.model.hub import upload_artifact

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "artifact", merge_lora=merge_lora)
            return upload_artifact(Path(tmp) / "artifact", repo_id, private=private, token=token)


def _checkpointed_layers(lm: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]


def _portable_reference(name: str) -> str:
    # A local LM folder is stored as an absolute path so the artifact loads from any working dir.
    return str(Path(name).resolve()) if os.path.isdir(name) else name


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Replace folder `path` by `tmp`; at every instant either the old or the new one is complete."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)  # between these two renames, resolve_artifact falls back to `old`
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _looks_local(path: str) -> bool:
    # A Hub id is exactly "org/name"; a .ckpt name, ./ ~/ / prefixes, deeper paths, backslashes or an
    # existing parent folder mean a local path, whose typo must not turn into a Hub download.
    parent = os.path.dirname(path)
    return (path.endswith(".ckpt") or path.startswith((".", "/", "~")) or path.count("/") != 1
            or "\\" in path or (bool(parent) and os.path.isdir(parent)))


def _missing_local(p: Path) -> str:
    import difflib

    parent = p.parent
    message = f"local model path {str(p)!r} does not exist"
    if parent.is_dir():
        near = difflib.get_close_matches(p.name, sorted(c.name for c in parent.iterdir() if not c.name.startswith(".")),
                                         n=3, cutoff=0.6)
        if near:
            message += f"; did you mean {', '.join(str(parent / n) for n in near)}?"
    elif str(parent) not in ("", "."):
        message += f" (its folder {str(parent)!r} does not exist either)"
    return message


def resolve_artifact(path: str | Path, **hf_kwargs: Any) -> Path:
    """A local artifact folder (falling back to a save's `.old` twin), or a Hub repo id downloaded."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    old = p.with_name(f".{p.name}.old")
    if (old / CONFIG_NAME).is_file():
        return old
    if p.exists():
        raise FileNotFoundError(f"{p} is not a prefixcap model: {CONFIG_NAME} is missing")
    if _looks_local(str(path)):
        raise FileNotFoundError(_missing_local(p))
    if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        keep = {k: v for k, v in hf_kwargs.items() if k in {"revision", "token", "cache_dir"}}
        return Path(snapshot_download(repo_id=str(path), **keep))
    raise FileNotFoundError(f"no prefixcap model at {path!r} (not a folder, not a Hub repo id)")
