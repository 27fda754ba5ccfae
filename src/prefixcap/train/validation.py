"""Validation during training: the caption loss on the validation set and, optionally, greedy-caption CIDEr."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefixcap.train.config import mapper_features

if TYPE_CHECKING:
    from prefixcap.train.setup import BuiltRun


class Validator:
    """Scores a run's model on its validation captions; a failing CIDEr is noticed once, never fatal."""

    def __init__(self, built: BuiltRun):
        self.built = built
        self._cider_notice = False  # the "CIDEr unavailable" notice has been printed

    def validate(self) -> float | None:
        """Token-weighted mean caption loss over the validation set, all processes together."""
        import torch

        built = self.built
        val_loader = built.loaders.val_loader
        if val_loader is None:
            return None
        model = built.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, device=built.device, dtype=torch.float64)
        with torch.no_grad():
            for batch in val_loader:
                emb, tokens, mask, *target = built.to_device(batch)  # target: the caption tokens, with --datastore
                loss = model(emb, tokens, mask, *target)
                n = (target[0] * mask).sum() if target else mask.sum()
                totals += torch.stack([loss.double() * n, n.double()])
        totals = built.accelerator.reduce(totals, reduction="sum")
        model.train(was_training)
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    def cider(self) -> float | None:
        """CIDEr of greedy captions for a few validation images (main process); None if unavailable."""
        built = self.built
        n = built.cfg.eval_cider_images
        if not n or built.loaders.val_loader is None or not built.accelerator.is_main_process:
            return None
        try:
            import numpy as np

            from prefixcap.caption.captioner import Captioner
            from prefixcap.evaluate.scoring import evaluate_predictions
            from prefixcap.caption.pipeline import Item, PipelineOptions, caption_items
            from prefixcap.retrieval.inference import retriever_for
            from prefixcap.retrieval.training import OwnCaptionsLeftOut

            data, val_idx = built.loaders.val_data.data, built.loaders.val_idx
            images = data.caption_image_indices()[val_idx]
            refs: dict[str, list[str]] = {}
            emb: dict[str, np.ndarray] = {}
            own: dict[str, str] = {}  # image -> its dataset key (the key its captions have in a datastore)
            for ci, img in zip(val_idx.tolist(), images.tolist()):
                key = f"{img}"
                if key not in refs and len(refs) >= n:
                    continue
                sample = data[ci]
                refs.setdefault(key, []).append(sample.caption)
                own[key] = sample.key
                emb[key] = sample.patch_tokens if mapper_features(built.cfg) == "patch_tokens" else sample.embedding
            model = built.unwrapped()
            was_training = model.training
            try:  # Captioner puts the model in eval mode; training must get its dropout back even on failure
                keys = list(refs)
                # A retrieval model captions with its prompt; the validation images' own captions are left out
                # of it, as in training (a datastore that holds them would make this CIDEr optimistic).
                retriever = retriever_for(model)
                if retriever is not None:
                    retriever = OwnCaptionsLeftOut(retriever, [own[k] for k in keys], np.stack([emb[k] for k in keys]))
                captioner = Captioner(model, retriever=retriever)
                items = (Item(k, embedding=emb[k]) for k in keys)
                results = list(caption_items(captioner, items, PipelineOptions(num_workers=1)))  # no decoding
            finally:
                model.train(was_training)
            failed = next((r for r in results if r.error is not None), None)
            if failed is not None:
                raise RuntimeError(f"validation image {failed.key}: {failed.error}")
            texts = [r.caption for r in results]
            result = evaluate_predictions(dict(zip(keys, texts)), refs, metrics=["cider"], progress=False)
            return float(result["metrics"]["CIDEr"])
        except Exception as err:  # noqa: BLE001 - an optional metric never stops training
            if not self._cider_notice:
                built.accelerator.print(f"prefixcap train: notice: CIDEr during training unavailable ({err}); "
                                        "validation loss only")
                self._cider_notice = True
            return None
