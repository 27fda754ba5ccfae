"""Hub push/pull goes through the standard huggingface_hub client (mocked: tests never use the network)."""

import fnmatch
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers_data import make_dataset

from prefixcap.cli import main as cli_main
from prefixcap.model.mapping import MappingConfig
from prefixcap.model.captioning import CONFIG_NAME, MAPPER_WEIGHTS, CaptionModel
from prefixcap.model.config import CaptionConfig
from prefixcap.train.cli import main as train_main


def _model(tiny_clip, tiny_gpt2) -> CaptionModel:
    cfg = CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                        mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32, prefix_length=4), only_prefix=True)
    return CaptionModel(cfg)


def _fake_hub(monkeypatch, uploaded: Path, fail: bool = False) -> dict:
    """huggingface_hub.HfApi replaced: records the calls and copies what would be uploaded (ignore_patterns applied)."""
    calls: dict = {"uploads": 0}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, ignore_patterns=None, commit_message=None, **kwargs):
            if fail:
                raise OSError("401 Client Error: Unauthorized\nmore detail")
            calls["uploads"] += 1
            calls["repo"], calls["patterns"], calls["message"] = repo_id, ignore_patterns or [], commit_message
            root = Path(folder_path)
            shutil.rmtree(uploaded, ignore_errors=True)
            for f in sorted(root.rglob("*")):
                rel = f.relative_to(root).as_posix()
                if f.is_file() and not any(fnmatch.fnmatch(rel, pat) for pat in calls["patterns"]):
                    (uploaded / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, uploaded / rel)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return calls


def test_push_uploads_the_artifact_folder(tiny_clip, tiny_gpt2, monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tmp_path / "uploaded")
    _model(tiny_clip, tiny_gpt2).push_to_hub("me/tiny-captioner", private=True, token="t0ken")
    assert calls["create"] == ("me/tiny-captioner", True, True) and calls["token"] == "t0ken"
    files = {p.name for p in (tmp_path / "uploaded").iterdir()}
    assert {CONFIG_NAME, MAPPER_WEIGHTS, "tokenizer", "README.md"} <= files
    assert "lm" not in files  # frozen LM: referenced by name, not uploaded
    card = huggingface_hub.ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert card.data.library_name == "prefixcap" and card.data.pipeline_tag == "image-to-text"
    assert CaptionModel.from_pretrained(tmp_path / "uploaded").config.prefix_length == 4


def test_from_pretrained_pulls_a_hub_id(tiny_clip, tiny_gpt2, monkeypatch, tmp_path):
    model = _model(tiny_clip, tiny_gpt2)
    model.save_pretrained(tmp_path / "snapshot")
    asked = {}

    def fake_snapshot_download(repo_id, **kwargs):
        asked["repo_id"], asked["kwargs"] = repo_id, kwargs
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = CaptionModel.from_pretrained("me/tiny-captioner", revision="v1")
    assert asked == {"repo_id": "me/tiny-captioner", "kwargs": {"revision": "v1"}}
    for a, b in zip(model.mapper.state_dict().values(), loaded.mapper.state_dict().values()):
        assert torch.equal(a, b)


# --- prefixcap train --push_to_hub and prefixcap push ---------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_gpt2) -> Path:
    """A finished LoRA training run (its checkpoints hold training_state/)."""
    root = tmp_path_factory.mktemp("lora_run")
    data = make_dataset(root / "data", tiny_gpt2, prefix_length=4)
    out = root / "out"
    assert train_main(["--data_dir", str(data), "--output_dir", str(out), "--batch_size", "16", "--epochs", "1",
                       "--num_workers", "0", "--mapping_type", "mlp", "--lora_rank", "2", "--warmup_steps", "0",
                       "--gpu_devices", "cpu", "--val_fraction", "0.25"]) == 0
    return out / "demo_model_final.ckpt"


def test_train_push_to_hub_uploads_the_final_model(tiny_gpt2, monkeypatch, tmp_path, capsys):
    calls = _fake_hub(monkeypatch, tmp_path / "uploaded")
    data = make_dataset(tmp_path / "data", tiny_gpt2, prefix_length=4)
    argv = ["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--batch_size", "16", "--epochs", "1",
            "--num_workers", "0", "--mapping_type", "mlp", "--only_prefix", "--gpu_devices", "cpu",
            "--push_to_hub", "me/run", "--hub_private", "--token", "hf_x"]
    assert train_main(argv) == 0
    assert calls["create"] == ("me/run", True, True) and calls["token"] == "hf_x" and calls["uploads"] == 1
    files = {p.relative_to(tmp_path / "uploaded").as_posix() for p in (tmp_path / "uploaded").rglob("*")}
    assert "README.md" in files and "mapper.safetensors" in files
    assert not any(f.startswith("training_state") for f in files)  # optimizer / RNG state stays local
    assert "pushed" in capsys.readouterr().out
    # A failed upload is one line and exit status 1; the model stays on disk.
    _fake_hub(monkeypatch, tmp_path / "never", fail=True)
    assert train_main(argv + ["--overwrite_output_dir"]) == 1
    err = capsys.readouterr().err
    assert "--push_to_hub me/run: upload failed (401 Client Error: Unauthorized)" in err and "Traceback" not in err
    assert (tmp_path / "out" / "demo_model_final.ckpt" / CONFIG_NAME).is_file()


def test_push_command_uploads_a_checkpoint_without_training_state(lora_run, monkeypatch, tmp_path, capsys):
    calls = _fake_hub(monkeypatch, tmp_path / "uploaded")
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"metrics": {"CIDEr": 0.512, "BLEU-4": 0.25, "CLIPScore": None},
                                   "counts": {"images": 40}}))
    assert (lora_run / "training_state").is_dir()
    assert cli_main(["push", str(lora_run), "me/lora", "--evaluation", str(results)]) == 0
    assert calls["repo"] == "me/lora" and "uploaded" in capsys.readouterr().out
    up = tmp_path / "uploaded"
    assert not (up / "training_state").exists() and (up / "lm_adapter" / "adapter_model.safetensors").is_file()
    card = huggingface_hub.ModelCard.load(up / "README.md")
    assert "lora" in card.data.tags and "CIDEr | 0.512" in card.text and "BLEU-4 | 0.25" in card.text
    assert "num captions | 48" in card.text  # the training data's counts (from the dataset manifest)
    loaded = CaptionModel.from_pretrained(up)
    assert loaded.config.lm_mode == "lora" and loaded.card_info["evaluation"]["CIDEr"] == 0.512

    assert cli_main(["push", str(lora_run), "me/merged", "--merge_lora"]) == 0
    assert (up / "lm").is_dir() and not (up / "lm_adapter").exists()
    assert CaptionModel.from_pretrained(up).config.lm_mode == "fine-tuned"


def test_push_command_refusals(lora_run, monkeypatch, tmp_path, capsys, tiny_clip, tiny_gpt2):
    _fake_hub(monkeypatch, tmp_path / "uploaded")
    assert cli_main(["push", str(tmp_path / "missing"), "me/x"]) == 2
    assert "not a prefixcap model folder" in capsys.readouterr().err
    frozen = _model(tiny_clip, tiny_gpt2).save_pretrained(tmp_path / "frozen")
    assert cli_main(["push", str(frozen), "me/x", "--merge_lora"]) == 2
    assert "has no LoRA adapter (its LM is frozen)" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert cli_main(["push", str(lora_run), "me/x", "--evaluation", str(tmp_path / "bad.json")]) == 2
    assert "no metrics in it" in capsys.readouterr().err
    _fake_hub(monkeypatch, tmp_path / "uploaded", fail=True)
    assert cli_main(["push", str(lora_run), "me/x"]) == 1
    assert "upload to me/x failed: 401 Client Error: Unauthorized" in capsys.readouterr().err
