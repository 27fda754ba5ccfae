"""Training on a text-only dataset: CapDec noise (training only, the given variance), the artifact, image captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_data import make_dataset
from prefixcap.model.captioning import CaptionModel
from prefixcap.model.config import CaptionConfig
from prefixcap.model.mapping import MappingConfig
from prefixcap.preprocess.cli import main as preprocess_main
from prefixcap.train.cli import main
from prep_helpers import run_args

CAPTIONS = ["a red circle on the left", "a small blue square", "there is a big green triangle at the top",
            "a yellow star in the middle", "one purple cross near the bottom"]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, tiny_clip, tiny_gpt2):
    folder = tmp_path_factory.mktemp("text_data")
    (folder / "c.txt").write_text("\n".join(CAPTIONS * 4) + "\n")
    assert preprocess_main(run_args(folder / "c.txt", folder / "data", tiny_clip, tiny_gpt2, "--text_only",
                                    "--num_prepro_workers", "0", "--prefix_length", "2", fmt="text")) == 0
    return str(folder / "data")


def train_argv(data: str, out, *extra: str) -> list[str]:
    return ["--data_dir", data, "--output_dir", str(out), "--epochs", "1", "--batch_size", "4", "--num_workers", "0",
            "--val_fraction", "0", "--warmup_steps", "0", "--only_prefix", "--save_every_epochs", "0", *extra]


def test_noise_is_added_in_training_mode_only_with_the_given_variance(tiny_gpt2):
    config = CaptionConfig(language_model=tiny_gpt2, mapping=MappingConfig(prefix_size=64, prefix_length=2),
                           normalize_prefix=True, noise_variance=0.04)
    model = CaptionModel(config)
    seen: list[torch.Tensor] = []
    model.mapper.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)) * 3  # (B, C), far from unit norm
    unit = x / x.norm(dim=1, keepdim=True)  # by hand, not through prefixcap's normalize
    torch.manual_seed(0)
    model.train()
    model.prefix(x)
    noise = seen[-1] - unit  # 32768 draws
    assert abs(noise.var().item() - 0.04) < 0.002  # the sample variance's sd is ~0.0003
    assert abs(noise.mean().item()) < 0.006  # the mean's sd is ~0.0011
    model.prefix(x)
    assert not torch.equal(seen[-1], seen[-2])  # fresh noise every call
    model.eval()
    model.prefix(x)
    torch.testing.assert_close(seen[-1], unit, rtol=0, atol=1e-6)  # inference: normalised, no noise
    model.config.noise_variance = 0.0
    model.train()
    model.prefix(x)
    torch.testing.assert_close(seen[-1], unit, rtol=0, atol=1e-6)


def test_text_trained_model_records_how_and_captions_images(text_data, tiny_clip, tmp_path, capsys):
    from prefixcap.caption.captioner import Captioner

    assert main(train_argv(text_data, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "is text-only: training adds CapDec noise of variance 0.016" in err
    assert "--normalize_prefix on (the dataset is text-only)" in err
    final = tmp_path / "out" / "demo_model_final.ckpt"
    saved = json.loads((final / "config.json").read_text())
    assert (saved["trained_on"], saved["noise_variance"], saved["normalize_prefix"]) == ("text", 0.016, True)
    card = (final / "README.md").read_text()
    assert "CLIP text embeddings of captions" in card and "variance 0.016 on the normalised embeddings" in card
    cap = Captioner.from_pretrained(final)
    assert cap.config.to_dict() == saved  # the artifact round trip
    cap.model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == saved
    again = Captioner.from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(cap.model.mapper.state_dict().items(), again.model.mapper.state_dict().items()):
        assert torch.equal(a, b), name

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    captions = cap.caption(images, batch_size=3)  # no flag: the recorded normalisation, no noise
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert cap.caption(images, batch_size=3) == captions
    emb = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    assert not cap.model.training
    torch.testing.assert_close(cap.model.prefix(emb), cap.model.prefix(5 * emb))  # the image side is normalised


def test_noise_flag_and_its_notices(text_data, tiny_gpt2, tmp_path, capsys):
    assert main(train_argv(text_data, tmp_path / "zero", "--noise_variance", "0")) == 0
    err = capsys.readouterr().err
    assert "CapDec noise" not in err and "--normalize_prefix on (the dataset is text-only)" in err
    assert json.loads((tmp_path / "zero" / "demo_model_final.ckpt" / "config.json").read_text())["noise_variance"] == 0
    image_data = make_dataset(tmp_path / "img", tiny_gpt2, num_images=4, num_shards=1, prefix_length=2)
    assert main(train_argv(str(image_data), tmp_path / "img_out", "--noise_variance", "0.01")) == 0
    assert "--noise_variance 0.01 is defined on unit-norm embeddings" in capsys.readouterr().err
    saved = json.loads((tmp_path / "img_out" / "demo_model_final.ckpt" / "config.json").read_text())
    assert (saved["trained_on"], saved["noise_variance"], saved["normalize_prefix"]) == ("image", 0.01, True)
    with pytest.raises(SystemExit) as exc:
        main(train_argv(text_data, tmp_path / "bad", "--noise_variance", "-1"))
    assert exc.value.code == 2 and "expected a finite number >= 0" in capsys.readouterr().err


def test_image_flags_and_another_clip_are_refused_in_one_line(text_data, tiny_gpt2, tmp_path, capsys):
    assert main(train_argv(text_data, tmp_path / "a", "--mapping_type", "projector")) == 2
    err = capsys.readouterr().err
    assert "is text-only (one CLIP text embedding per caption)" in err and len(err.strip().splitlines()) == 1
    other = make_dataset(tmp_path / "other", tiny_gpt2, num_images=4, num_shards=1, prefix_length=2,
                         manifest_overrides={"clip_model": "another-clip"})
    assert main(train_argv(text_data, tmp_path / "b", "--val_data_dir", str(other))) == 2
    err = capsys.readouterr().err
    assert "clip_model" in err and "another-clip" in err and len(err.strip().splitlines()) == 1


def test_caption_and_evaluate_refuse_a_text_only_dataset_in_one_line(text_data, tiny_clip, tiny_gpt2, tmp_path,
                                                                    capsys):
    """Its rows are captions whose embeddings are their own references: captioning or scoring them as if they
    were images would give a number that means nothing, so both commands refuse (exit 2) and name the folder."""
    from model_helpers import build_artifact
    from prefixcap.caption.cli import main as caption_main
    from prefixcap.evaluate.cli import main as evaluate_main

    from prep_helpers import simple_webdataset

    model = str(build_artifact(tmp_path / "model", tiny_clip, tiny_gpt2, "causal"))
    out, shards = tmp_path / "captions.jsonl", tmp_path / "shards"
    images = [str(t) for t in simple_webdataset(tmp_path / "wds", num_tars=1)]  # read before it, had it been good
    for inputs in ([text_data], [*images, text_data]):
        for flags in (["--output", str(out)], ["--output_dir", str(shards)]):
            argv = ["--model", model, "--no_progress", *flags, *inputs]
            assert caption_main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "Traceback" not in err, argv
            assert text_data in err and "CLIP text embeddings of captions" in err, argv
            assert not out.exists() and not list(shards.glob("**/*.jsonl")), argv  # refused before any captioning
    predictions = tmp_path / "predictions.jsonl"  # well-formed, keyed as the dataset's rows: only the dataset is wrong
    predictions.write_text("".join(json.dumps({"key": f"c/{i}#0", "caption": c}) + "\n"
                                   for i, c in enumerate(CAPTIONS, 1)))
    for flags in (["--model", model, "--dataset", text_data],
                  ["--references", text_data, "--predictions", str(predictions)]):
        assert evaluate_main([*flags, "--output_dir", str(tmp_path / "eval")]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text_data in err and "one row per caption" in err, flags
    assert not (tmp_path / "eval" / "metrics.json").exists()
