"""LoRA on the LM: target modules, what trains, save/load/merge, exact resume, and LoRA vs frozen vs fine-tuned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_data import make_dataset
from safetensors.torch import load_file

import prefixcap.train.loop as loop_module
from prefixcap.model.adapters import ADAPTER_DIR, LORA_TARGETS, AdapterError, resolve_settings
from prefixcap.train.checkpoint import load_checkpoint
from prefixcap.model.language_models import load_language_model
from prefixcap.model.mapping import MappingConfig
from prefixcap.model import CaptionConfig, CaptionModel
from prefixcap.train.run import train
from prefixcap.train.cli import main, parse_config

K = 4


def _lora_model(lm_path: str, family: str, rank: int = 4, dropout: float = 0.0, targets=None) -> CaptionModel:
    torch.manual_seed(0)
    lm = load_language_model(lm_path, family)
    cfg = CaptionConfig(clip_model="tiny", language_model=lm_path, lm_family=family, tokenizer=lm_path,
                        mapping=MappingConfig("mlp", prefix_size=16, prefix_length=K),
                        lora=resolve_settings(lm, rank, 8.0, dropout, targets))
    return CaptionModel(cfg, lm=lm)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 150, (3, 6), generator=g)  # within both tiny vocabularies
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    return torch.randn(3, 16, generator=g), tokens, mask


def _train_steps(model: CaptionModel, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for s in range(steps):
        model(*_batch(s)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("family_fixture,family,expected", [("tiny_gpt2", "causal", ["c_attn", "c_proj"]),
                                                            ("tiny_t5", "seq2seq", ["q", "v"])])
def test_default_targets_per_lm_type_and_only_adapters_train(family_fixture, family, expected, request):
    lm_path = request.getfixturevalue(family_fixture)
    model = _lora_model(lm_path, family)
    assert model.config.lora.target_modules == expected == LORA_TARGETS[model.lm.config.model_type]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lm_trainable = [n for n in trainable if n.startswith("lm.")]
    assert lm_trainable and all(".lora_A." in n or ".lora_B." in n for n in lm_trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lm_trainable} == set(expected)
    assert any(n.startswith("mapper.") for n in trainable)
    # The LM keeps its own class (PEFT injects layers in place), so the loss path and generate are unchanged.
    assert type(model.lm).__name__ in {"GPT2LMHeadModel", "T5ForConditionalGeneration"}
    assert model.config.lm_mode == "lora"


def test_new_adapter_leaves_the_lm_unchanged_until_trained(tiny_gpt2):
    lora = _lora_model(tiny_gpt2, "causal")
    torch.manual_seed(0)
    plain = CaptionModel(CaptionConfig(clip_model="tiny", language_model=tiny_gpt2, tokenizer=tiny_gpt2,
                                       mapping=MappingConfig("mlp", prefix_size=16, prefix_length=K)))
    plain.mapper.load_state_dict(lora.mapper.state_dict())
    lora.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(lora(*_batch()), plain(*_batch()))  # lora_B starts at zero
    _train_steps(lora)
    with torch.no_grad():
        assert not torch.allclose(lora(*_batch()), plain(*_batch()))


def test_target_override_and_refusals(tiny_gpt2):
    lm = load_language_model(tiny_gpt2, "causal")
    assert resolve_settings(lm, 2, 4, 0.1, ["c_attn"]).target_modules == ["c_attn"]
    with pytest.raises(AdapterError, match="no module named q_proj"):
        resolve_settings(lm, 2, 4, 0.1, ["q_proj"])
    with pytest.raises(AdapterError, match="--lora_rank must be >= 1"):
        resolve_settings(lm, 0, 4, 0.1)
    lm.config.model_type = "no-such-type"
    with pytest.raises(AdapterError, match="--lora_target_modules"):
        resolve_settings(lm, 2, 4, 0.1)


@pytest.mark.parametrize("family_fixture,family", [("tiny_gpt2", "causal"), ("tiny_t5", "seq2seq")])
def test_adapter_artifact_round_trip_and_merge(family_fixture, family, request, tmp_path):
    lm_path = request.getfixturevalue(family_fixture)
    model = _lora_model(lm_path, family)
    _train_steps(model)
    with torch.no_grad():
        expected = model(*_batch(7))
    path = model.save_pretrained(tmp_path / "lora")
    assert (path / ADAPTER_DIR / "adapter_model.safetensors").is_file() and not (path / "lm").exists()
    saved = json.loads((path / "config.json").read_text())
    assert saved["lora"]["rank"] == 4 and saved["lora"]["target_modules"] == model.config.lora.target_modules
    loaded = CaptionModel.from_pretrained(path)  # base LM by name from config.json, adapter from lm_adapter/
    with torch.no_grad():
        assert torch.equal(loaded(*_batch(7)), expected)

    merged_path = model.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert (merged_path / "lm").is_dir() and not (merged_path / ADAPTER_DIR).exists()
    merged = CaptionModel.from_pretrained(merged_path)
    assert merged.config.lora is None and merged.config.lm_mode == "fine-tuned"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(*_batch(7)), expected, rtol=1e-5, atol=1e-5)
    # Merging a copy left the model itself with its adapter.
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_missing_adapter_is_a_clear_error(tiny_gpt2, tmp_path):
    path = _lora_model(tiny_gpt2, "causal").save_pretrained(tmp_path / "m")
    import shutil

    shutil.rmtree(path / ADAPTER_DIR)
    with pytest.raises(FileNotFoundError, match="lm_adapter/adapter_config.json is missing"):
        CaptionModel.from_pretrained(path)


def test_fine_tuned_model_without_its_lm_folder_is_a_clear_error(tiny_gpt2, tmp_path):
    """Never the base LM by name in place of the fine-tuned weights (captions and resume would be wrong)."""
    import shutil

    model = CaptionModel(CaptionConfig(clip_model="tiny", language_model=tiny_gpt2,
                                       mapping=MappingConfig("mlp", prefix_size=16, prefix_length=K)))
    path = model.save_pretrained(tmp_path / "tuned")
    CaptionModel.from_pretrained(path)  # complete: loads
    shutil.rmtree(path / "lm")
    with pytest.raises(FileNotFoundError, match=r"holds a model whose LM was fine-tuned, but its lm/ folder is "
                                                r"missing; copy the whole artifact folder$"):
        CaptionModel.from_pretrained(path)


# --- through the trainer -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_gpt2) -> str:
    return str(make_dataset(tmp_path_factory.mktemp("lora_data"), tiny_gpt2, prefix_length=K))


def _argv(data: str, out: Path, *extra: str) -> list[str]:
    return ["--data_dir", data, "--output_dir", str(out), "--batch_size", "8", "--num_workers", "0",
            "--mapping_type", "mlp", "--warmup_steps", "0", "--lr", "5e-3", "--gpu_devices", "cpu",
            "--save_every_steps", "3", "--save_every_epochs", "1", *extra]


@pytest.mark.parametrize("extra,message", [
    (("--lora_rank", "4", "--only_prefix"), "--lora_rank trains adapters inside the LM, --only_prefix"),
    (("--merge_lora",), "--merge_lora merges a LoRA adapter: it needs --lora_rank"),
    (("--lora_rank", "4", "--lora_target_modules", "q_proj"), "no module named q_proj"),
    (("--lora_rank", "4", "--lora_dropout", "1.5"), "--lora_dropout must be in [0, 1)"),
])
def test_refused_lora_flags(extra, message, data, tmp_path, capsys):
    assert main(_argv(data, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err


def _final_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    w = {f"mapper.{k}": v for k, v in load_file(ckpt / "mapper.safetensors").items()}
    w.update({f"adapter.{k}": v for k, v in load_file(ckpt / ADAPTER_DIR / "adapter_model.safetensors").items()})
    return w


def test_interrupted_lora_run_resumes_to_identical_weights(data, tmp_path, monkeypatch):
    """Interrupted after step 4 (last _latest at step 3), --resume: the adapter and mapper equal an
    uninterrupted run's bit for bit (LoRA dropout on, so RNG state matters)."""
    lora = ("--lora_rank", "4", "--lora_dropout", "0.2", "--epochs", "2")  # 48 captions: 6 steps/epoch
    straight = train(parse_config(_argv(data, tmp_path / "straight", *lora)))
    assert straight.global_step == 12

    real_seed = loop_module._group_seed

    def interrupt_at_step_4(seed, rank, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_seed(seed, rank, step)

    monkeypatch.setattr(loop_module, "_group_seed", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(_argv(data, tmp_path / "resumed", *lora)))
    monkeypatch.setattr(loop_module, "_group_seed", real_seed)
    latest = tmp_path / "resumed" / "demo_model_latest.ckpt"
    assert load_checkpoint(latest).state.global_step == 3
    resumed = train(parse_config(_argv(data, tmp_path / "resumed", *lora, "--resume")))
    assert resumed.resumed_from is not None and resumed.global_step == 12
    a = _final_weights(tmp_path / "straight" / "demo_model_final.ckpt")
    b = _final_weights(tmp_path / "resumed" / "demo_model_final.ckpt")
    assert a.keys() == b.keys() and any(k.startswith("adapter.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_optimizer_state_only_in_latest_and_epoch_resume_notice(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(data, out, "--lora_rank", "4", "--epochs", "2")) == 0
    latest, epoch0, final = (load_checkpoint(out / f"demo_model_{t}.ckpt") for t in ("latest", 0, "final"))
    assert "optimizer" in latest.payload
    assert "optimizer" not in epoch0.payload and "optimizer" not in final.payload
    assert "scheduler" in epoch0.payload and "rng" in epoch0.payload
    for tag in ("latest", 0, "final"):  # LoRA: no checkpoint holds the LM's weights
        folder = out / f"demo_model_{tag}.ckpt"
        assert not (folder / "lm").exists() and (folder / ADAPTER_DIR).is_dir()
    # An epoch checkpoint still resumes (fresh AdamW moments), and says so.
    capsys.readouterr()
    assert main(_argv(data, out, "--lora_rank", "4", "--epochs", "3", "--resume", str(out / "demo_model_0.ckpt"))) == 0
    assert "holds no optimizer state" in capsys.readouterr().out


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """Demo-like data (shape captions, one embedding per image) and a GPT-2 of the demo's width (64)."""
    from prefixcap.demo.tiny_models import build_tiny_gpt2

    root = tmp_path_factory.mktemp("demo_like")
    lm = build_tiny_gpt2(root / "lm", n_embd=64, n_layer=2, n_head=2)
    captions = ["a red circle on the left.", "one big blue star at the top.", "a tiny green square in the middle.",
                "a photo of a yellow cross on the right.", "there is a purple triangle at the bottom.",
                "an image with a white star in the centre."]
    data = make_dataset(root / "data", str(lm), num_images=12, captions_per_image=1, num_shards=1,
                        captions=captions, prefix_length=K)
    return str(data), str(lm)


def test_lora_beats_frozen_and_its_adapter_is_small(demo_like, tmp_path):
    data, lm = demo_like
    common = ["--data_dir", data, "--language_model", lm, "--batch_size", "6", "--epochs", "15", "--num_workers",
              "0", "--mapping_type", "mlp", "--warmup_steps", "0", "--lr", "5e-3", "--gpu_devices", "cpu",
              "--save_every_steps", "0", "--save_every_epochs", "0", "--seed", "1"]
    runs = {}
    for mode, extra in {"frozen": ["--only_prefix"], "lora": ["--lora_rank", "4", "--lora_dropout", "0"],
                        "fine-tuned": []}.items():
        out = tmp_path / mode
        runs[mode] = (train(parse_config(common + ["--output_dir", str(out), *extra])), out / "demo_model_final.ckpt")
    (frozen, f_ckpt), (lora, l_ckpt), (tuned, t_ckpt) = runs["frozen"], runs["lora"], runs["fine-tuned"]
    assert frozen.global_step == lora.global_step == tuned.global_step == 30
    assert lora.epoch_train_losses[-1] < frozen.epoch_train_losses[-1], (lora.epoch_train_losses,
                                                                      frozen.epoch_train_losses)
    # The LoRA artifact stores the adapter instead of the LM: < 5 % of the fine-tuned artifact's LM weights.
    adapter, full_lm = _size(l_ckpt / ADAPTER_DIR), _size(t_ckpt / "lm")
    assert not (f_ckpt / "lm").exists() and not (l_ckpt / "lm").exists()
    assert adapter < 0.05 * full_lm, (adapter, full_lm)
