"""Model cards: the Hub metadata header, and what the config, training data and last evaluation say."""

from __future__ import annotations

from huggingface_hub import ModelCard
from helpers_data import make_dataset

from prefixcap.model.adapters import LoraSettings
from prefixcap.model.mapping import MappingConfig
from prefixcap.model import CaptionConfig, CaptionModel
from prefixcap.model.card import evaluation_summary, render_card
from prefixcap.train.cli import main as train_main


def _card(text: str) -> ModelCard:
    return ModelCard(text)


def test_metadata_names_hub_models_and_datasets_only(tmp_path):
    cfg = CaptionConfig(clip_model="ViT-B/32", language_model="gpt2", mapping=MappingConfig("transformer"),
                        lora=LoraSettings(rank=8, target_modules=["c_attn", "c_proj"]))
    info = {"training_data": {"num_images": 1000, "num_captions": 5000,
                              "datasets": ["someone/coco-captions", str(tmp_path)]},
            "evaluation": {"CIDEr": 1.0312, "validation_loss": 2.5}}
    card = _card(render_card(cfg, info))
    assert card.data.library_name == "prefixcap" and card.data.pipeline_tag == "image-to-text"
    assert card.data.base_model == ["gpt2", "openai/clip-vit-base-patch32"]  # OpenAI CLIP name -> its Hub port
    assert card.data.datasets == ["someone/coco-captions"]  # a local folder is not a Hub dataset id
    assert {"image-captioning", "lora", "peft", "lm-lora"} <= set(card.data.tags)
    text = card.text
    assert "rank 8, alpha 16, dropout 0.05, on `c_attn`, `c_proj`" in text
    assert "num captions | 5,000" in text and "CIDEr | 1.031" in text
    # A local LM folder is described in the text but never claimed as a base model.
    local = CaptionConfig(clip_model=str(tmp_path / "clip"), language_model=str(tmp_path), only_prefix=True)
    card = _card(render_card(local, {}))
    assert card.data.base_model is None and "No evaluation recorded" in card.text
    assert "frozen (only the mapping network was trained" in card.text


def test_every_saved_artifact_has_a_card(tmp_path, tiny_gpt2):
    cfg = CaptionConfig(clip_model="tiny", language_model=tiny_gpt2, tokenizer=tiny_gpt2, only_prefix=True,
                        mapping=MappingConfig("mlp", prefix_size=16, prefix_length=3))
    path = CaptionModel(cfg).save_pretrained(tmp_path / "m")
    card = ModelCard.load(path / "README.md")
    assert card.data.library_name == "prefixcap" and "lm-frozen" in card.data.tags


def test_trained_checkpoints_describe_data_and_last_validation(tmp_path, tiny_gpt2):
    data = make_dataset(tmp_path / "data", tiny_gpt2, prefix_length=4, manifest_overrides={
        "hub_datasets": ["someone/shapes"]})
    out = tmp_path / "out"
    assert train_main(["--data_dir", str(data), "--output_dir", str(out), "--batch_size", "8", "--epochs", "1",
                       "--num_workers", "0", "--mapping_type", "mlp", "--only_prefix", "--gpu_devices", "cpu",
                       "--val_fraction", "0.25"]) == 0
    card = ModelCard.load(out / "demo_model_final.ckpt" / "README.md")
    assert card.data.datasets == ["someone/shapes"]
    text = card.text
    assert "num images | 24" in text and "num captions | 48" in text and "num train captions | 36" in text
    assert "validation loss |" in text and "optimizer steps | 5" in text
    loaded = CaptionModel.from_pretrained(out / "demo_model_final.ckpt")
    assert loaded.card_info["training_data"]["num_captions"] == 48


def test_evaluation_summary_keeps_numeric_metrics():
    results = {"metrics": {"CIDEr": 0.9, "SPICE": None, "BLEU-4": 0.3}, "counts": {"images": 5000, "ok": True},
               "settings": {"x": 1}}
    assert evaluation_summary(results) == {"CIDEr": 0.9, "BLEU-4": 0.3, "images (count)": 5000}
