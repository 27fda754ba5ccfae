"""Hub push/pull goes through the standard huggingface_hub client (mocked: tests never use the network)."""

import shutil
from pathlib import Path

import huggingface_hub
import torch

from prefixcap.mapping import MappingConfig
from prefixcap.model import CONFIG_NAME, MAPPER_WEIGHTS, CaptionConfig, CaptionModel


def _model(tiny_clip, tiny_gpt2) -> CaptionModel:
    cfg = CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                        mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32, prefix_length=4), only_prefix=True)
    return CaptionModel(cfg)


def test_push_uploads_the_artifact_folder(tiny_clip, tiny_gpt2, monkeypatch, tmp_path):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path):
            # The folder is a complete artifact at upload time.
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            shutil.copytree(folder_path, tmp_path / "uploaded")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    _model(tiny_clip, tiny_gpt2).push_to_hub("me/tiny-captioner", private=True, token="t0ken")
    assert calls["create"] == ("me/tiny-captioner", True, True) and calls["token"] == "t0ken"
    assert {CONFIG_NAME, MAPPER_WEIGHTS, "tokenizer"} <= set(calls["files"])
    assert "lm" not in calls["files"]  # frozen LM: referenced by name, not uploaded
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
