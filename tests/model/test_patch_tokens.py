"""Patch tokens end to end: pooling, the encoder's tokens, preprocessing (shapes, dtype, resume), the two
token mappers (shapes, save/load, exact training resume), captioning from images vs stored tokens, scenes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from prep_helpers import image_bytes, simple_webdataset

from prefixcap import load_preprocessed
from prefixcap.data.shards import SHARD_DIR
from prefixcap.model.mapping import MappingConfig, build_mapper, with_token_input
from prefixcap.model.patch_tokens import num_tokens, pool_patch_tokens
from prefixcap.preprocess.cli import main as preprocess_main
from prefixcap.train.cli import main as train_main

SIZE = (40, 30)
POOL = 2
N_POOLED = 5  # tiny CLIP: 32 px, 8 px patches -> 4 x 4 grid -> 2 x 2 after pooling, plus CLS
C = 16  # the tiny CLIP's projection_dim


def _pre_args(wds: Path, out: Path, clip: str, lm: str, *extra: str) -> list[str]:
    tars = sorted(str(p) for p in wds.glob("*.tar"))
    return ["--input_dataset", *tars, "--output_folder", str(out), "--input_format", "webdataset",
            "--clip_model", clip, "--tokenizer_model_type", "gpt2", "--tokenizer_model_variant", lm,
            "--device", "cpu", "--no_progress", "--num_prepro_workers", "0", "--batch_size", "2",
            "--samples_per_shard", "2", *extra]


def _images(wds: Path) -> dict[str, Image.Image]:
    """key -> decoded image of the simple_webdataset samples (same seeds as prep_helpers)."""
    return {f"{t:03d}{i:04d}": Image.open(io.BytesIO(image_bytes(t * 100 + i, size=SIZE))).convert("RGB")
            for t in range(3) for i in range(4)}


@pytest.fixture(scope="module")
def token_data(tmp_path_factory, tiny_clip, tiny_gpt2):
    """12 images preprocessed with --store_patch_tokens --patch_pool 2 (2 images per shard)."""
    work = tmp_path_factory.mktemp("patch_tokens")
    simple_webdataset(work / "wds", num_tars=3, per_tar=4, size=SIZE)
    out = work / "pre"
    assert preprocess_main(_pre_args(work / "wds", out, tiny_clip, tiny_gpt2, "--store_patch_tokens",
                                     "--patch_pool", str(POOL))) == 0
    return work, out


# --- pooling and the encoder ---------------------------------------------------------------
def test_pooling_averages_blocks_keeps_cls_and_handles_odd_grids():
    grid = torch.arange(9, dtype=torch.float32).view(1, 9, 1)  # a 3 x 3 grid of values 0..8
    tokens = torch.cat((torch.full((1, 1, 1), -1.0), grid), dim=1)  # (1, 10, 1), CLS = -1
    pooled = pool_patch_tokens(tokens, 2)[0, :, 0]
    # blocks {0,1,3,4}, {2,5}, {6,7}, {8}: edge blocks average only the patches they have
    assert pooled.tolist() == [-1.0, 2.0, 3.5, 6.5, 8.0]
    assert num_tokens(3, 2) == 5 and num_tokens(7, 2) == 17 and num_tokens(7, 1) == 50
    assert pool_patch_tokens(tokens, 1) is tokens


def test_encoder_tokens_start_with_the_pooled_embedding(tiny_clip):
    from prefixcap.model.encoders import load_encoder

    encoder = load_encoder(tiny_clip)
    pixels = torch.from_numpy(np.stack([encoder.preprocessor()(im) for im in list(_images(Path("."))
                                                                                    .values())[:3]]))
    pooled, full = encoder.encode_pixels_with_tokens(pixels, 1)
    assert full.shape == (3, 17, C) and full.dtype == torch.float32
    torch.testing.assert_close(pooled, encoder.encode_pixels(pixels))
    torch.testing.assert_close(full[:, 0], pooled)  # token 0 is the pooled embedding
    small = encoder.encode_patch_tokens(pixels, POOL)
    assert small.shape == (3, N_POOLED, C) and encoder.patch_token_shape(POOL) == (N_POOLED, C)
    grid = full[:, 1:].view(3, 4, 4, C)
    torch.testing.assert_close(small[:, 1], grid[:, :2, :2].mean(dim=(1, 2)))  # top-left 2 x 2 block


# --- preprocessing ------------------------------------------------------------------------
def test_preprocess_stores_float16_tokens_and_records_them(token_data, tiny_clip, capsys):
    from prefixcap.model.encoders import load_encoder

    _, out = token_data
    data = load_preprocessed(out)
    record = data.manifest.patch_tokens
    assert (record["num_tokens"], record["dim"], record["pool"], record["dtype"]) == (N_POOLED, C, POOL, "float16")
    table = pa.ipc.open_file(pa.memory_map(str(next((out / SHARD_DIR).glob("*.images.arrow"))))).read_all()
    column = table.schema.field("patch_tokens").type
    assert column.value_type == pa.float16() and column.list_size == N_POOLED * C
    encoder = load_encoder(tiny_clip)
    images = _images(Path("."))
    for i in range(data.num_images):
        key, emb = data.image(i)
        tokens = data.image_patch_tokens(i)
        assert tokens.shape == (N_POOLED, C) and tokens.dtype == np.float32
        pixels = torch.from_numpy(encoder.preprocessor()(images[key])[None])
        expected = encoder.encode_patch_tokens(pixels, POOL)[0].numpy()
        np.testing.assert_allclose(tokens, expected, rtol=2e-3, atol=2e-3)  # float16 storage
        np.testing.assert_array_equal(tokens[0], emb)  # CLS token == the stored pooled embedding
    assert data[0].patch_tokens.shape == (N_POOLED, C)
    assert json.loads((out / "settings.json").read_text())["patch_pool"] == POOL


def test_preprocess_summary_prints_the_storage_cost(tmp_path, tiny_clip, tiny_gpt2, capsys):
    simple_webdataset(tmp_path / "wds", num_tars=1, per_tar=2, size=SIZE)
    assert preprocess_main(_pre_args(tmp_path / "wds", tmp_path / "pre", tiny_clip, tiny_gpt2,
                                     "--store_patch_tokens")) == 0
    out = capsys.readouterr().out
    assert "patch tokens: 17 x 16 float16 per image (pool 1)" in out and "17x the pooled embeddings'" in out


def _dump(path: Path) -> list:
    data = load_preprocessed(path)
    return [(s.key, s.tokens.tolist(), s.embedding.tobytes(), s.patch_tokens.tobytes()) for s in data]


def test_preprocess_resume_completes_a_crashed_token_run(token_data, tiny_clip, tiny_gpt2, tmp_path, capsys):
    import shutil

    work, reference = token_data
    out = tmp_path / "crashed"
    shutil.copytree(reference, out)
    # What a kill -9 after four shards leaves: the later shards' stats (written last) and the manifest missing.
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "progress")
    stats = sorted((out / SHARD_DIR).glob("*.json"))
    for path in stats[4:]:
        path.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in stats[:4]}
    assert preprocess_main(_pre_args(work / "wds", out, tiny_clip, tiny_gpt2, "--store_patch_tokens",
                                     "--patch_pool", str(POOL))) == 0
    assert {p.name: p.stat().st_mtime_ns for p in stats[:4]} == kept  # finished shards were not redone
    assert _dump(out) == _dump(reference)
    # Resuming with another pooling, or without tokens, is refused with the one differing flag named.
    capsys.readouterr()
    (out / "manifest.json").unlink()
    assert preprocess_main(_pre_args(work / "wds", out, tiny_clip, tiny_gpt2, "--store_patch_tokens")) == 2
    assert "patch_pool: folder has 2, this run asks for 1" in capsys.readouterr().err
    assert preprocess_main(_pre_args(work / "wds", out, tiny_clip, tiny_gpt2)) == 2
    assert "store_patch_tokens: folder has True, this run asks for None" in capsys.readouterr().err


def test_patch_pool_without_tokens_is_refused(tmp_path, tiny_clip, tiny_gpt2, capsys):
    simple_webdataset(tmp_path / "wds", num_tars=1, per_tar=1, size=SIZE)
    assert preprocess_main(_pre_args(tmp_path / "wds", tmp_path / "pre", tiny_clip, tiny_gpt2,
                                     "--patch_pool", "2")) == 2
    assert "add --store_patch_tokens" in capsys.readouterr().err


# --- the token mappers --------------------------------------------------------------------
def _token_cfg(mapping_type: str, k: int = 3) -> MappingConfig:
    cfg = MappingConfig(mapping_type=mapping_type, prefix_size=C, lm_dim=32, prefix_length=k, num_layers=2,
                        num_heads=4)
    return with_token_input(cfg, {"num_tokens": N_POOLED, "pool": POOL}, "test data")


@pytest.mark.parametrize("mapping_type,k", [("transformer_tokens", 3), ("projector", N_POOLED)])
def test_token_mappers_map_tokens_to_a_prefix(mapping_type, k):
    torch.manual_seed(0)
    cfg = _token_cfg(mapping_type)
    assert (cfg.prefix_length, cfg.num_tokens, cfg.patch_pool, cfg.input_shape) == (k, N_POOLED, POOL, (N_POOLED, C))
    mapper = build_mapper(cfg)
    x = torch.randn(2, N_POOLED, C)
    out = mapper(x)
    assert out.shape == (2, k, 32)
    torch.testing.assert_close(mapper(x[:1]), out[:1])  # images are mapped independently
    assert not torch.allclose(mapper(x.flip(1))[0], out[0])  # the token order (patch position) matters
    with pytest.raises(ValueError, match=rf"expects patch tokens of shape \(B, {N_POOLED}, {C}\)"):
        mapper(torch.randn(2, C))


def test_token_mapper_needs_a_dataset_with_tokens():
    with pytest.raises(ValueError, match="preprocess it again with --store_patch_tokens"):
        with_token_input(MappingConfig(mapping_type="projector"), None, "the dataset x")
    with pytest.raises(ValueError, match="num_tokens must be set"):
        build_mapper(MappingConfig(mapping_type="transformer_tokens"))
    pooled = MappingConfig(mapping_type="mlp")
    assert with_token_input(pooled, None, "x") is pooled and not pooled.takes_tokens


@pytest.mark.parametrize("mapping_type", ["transformer_tokens", "projector"])
def test_token_model_saves_and_loads(mapping_type, tiny_gpt2, tmp_path):
    from prefixcap.model import CaptionConfig, CaptionModel

    torch.manual_seed(0)
    config = CaptionConfig(clip_model="tiny", language_model=tiny_gpt2, mapping=_token_cfg(mapping_type),
                           only_prefix=True)
    model = CaptionModel(config).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = CaptionModel.from_pretrained(tmp_path / "m")
    assert loaded.config.mapping == model.config.mapping
    x = torch.randn(2, N_POOLED, C)
    torch.testing.assert_close(loaded.prefix(x), model.prefix(x), rtol=0, atol=0)


def _train_argv(data: Path, out: Path, mapping_type: str, *extra: str) -> list[str]:
    return ["--data_dir", str(data), "--output_dir", str(out), "--mapping_type", mapping_type,
            "--prefix_length", "3", "--num_layers", "1", "--num_attention_heads", "2", "--epochs", "3",
            "--batch_size", "4", "--lr", "1e-3", "--warmup_steps", "2", "--save_every_epochs", "0",
            "--save_every_steps", "2", "--num_workers", "0", "--val_fraction", "0", "--seed", "3", *extra]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    w = dict(load_file(ckpt / "mapper.safetensors"))
    for f in sorted((ckpt / "lm").glob("*.safetensors")):
        w.update({f"lm.{k}": v for k, v in load_file(f).items()})
    return w


@pytest.mark.parametrize("mapping_type", ["transformer_tokens", "projector"])
def test_token_training_resumes_exactly(token_data, tmp_path, mapping_type, monkeypatch):
    _, data = token_data
    assert train_main(_train_argv(data, tmp_path / "straight", mapping_type)) == 0
    step, calls = torch.optim.AdamW.step, {"n": 0}

    def interrupted_step(self, *args, **kwargs):  # Ctrl-C during the 5th optimizer step (after the step-4 save)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted_step)
    assert train_main(_train_argv(data, tmp_path / "cut", mapping_type)) == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert train_main(_train_argv(data, tmp_path / "cut", mapping_type, "--resume")) == 0
    a = _weights(tmp_path / "straight" / "demo_model_final.ckpt")
    b = _weights(tmp_path / "cut" / "demo_model_final.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "cut" / "demo_model_final.ckpt" / "config.json").read_text())
    assert config["mapping"]["num_tokens"] == N_POOLED and config["mapping"]["patch_pool"] == POOL


@pytest.mark.parametrize("mapping_type", ["transformer_tokens", "projector"])
def test_validation_cider_of_a_token_model_captions_from_the_stored_tokens(token_data, tmp_path, mapping_type,
                                                                          capsys):
    """Validation CIDEr during training hands a token mapper the stored patch tokens (not the pooled vector,
    which its Captioner refuses: CIDEr would silently become 'unavailable')."""
    _, data = token_data
    argv = _train_argv(data, tmp_path, mapping_type, "--val_fraction", "0.34", "--eval_cider_images", "2",
                       "--epochs", "1", "--save_every_steps", "0")
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "CIDEr during training unavailable" not in out
    summary = json.loads((tmp_path / "demo_model_summary.json").read_text())
    assert len(summary["cider"]) == 1 and summary["cider"][0]["cider"] >= 0.0


def test_token_mapper_on_pooled_only_data_is_refused(tmp_path, tiny_clip, tiny_gpt2, capsys):
    simple_webdataset(tmp_path / "wds", num_tars=1, per_tar=2, size=SIZE)
    assert preprocess_main(_pre_args(tmp_path / "wds", tmp_path / "pre", tiny_clip, tiny_gpt2)) == 0
    assert train_main(_train_argv(tmp_path / "pre", tmp_path / "m", "projector")) == 2
    err = capsys.readouterr().err
    assert "stores no patch tokens (preprocess it with --store_patch_tokens)" in err and "Traceback" not in err


# --- captioning ---------------------------------------------------------------------------
def test_captions_from_images_equal_captions_from_stored_tokens(token_data, tmp_path, tiny_clip):
    from prefixcap.caption.captioner import Captioner
    from prefixcap.caption.cli import main as caption_main

    work, data_dir = token_data
    assert train_main(_train_argv(data_dir, tmp_path / "m", "transformer_tokens", "--epochs", "5", "--lr", "1e-2",
                                  "--save_every_steps", "1000")) == 0
    model = tmp_path / "m" / "demo_model_final.ckpt"
    cap = Captioner.from_pretrained(model, clip_model=tiny_clip)
    data = load_preprocessed(data_dir)
    keys = [data.image(i)[0] for i in range(data.num_images)]
    stored = np.stack([data.image_patch_tokens(i) for i in range(data.num_images)])  # (12, N, C)
    from_tokens, scores = cap.caption_embeddings(stored, max_new_tokens=12, return_scores=True)
    images = _images(Path("."))
    from_images, image_scores = cap.caption([images[k] for k in keys], max_new_tokens=12, return_scores=True)
    assert from_images == from_tokens
    # Not vacuous: each image gets its own score, and the on-the-fly tokens give the same ones (up to
    # the float16 rounding of the stored tokens).
    assert len({round(x, 4) for x in scores}) > 6
    np.testing.assert_allclose(image_scores, scores, atol=1e-3)
    # The caption CLI on image files: the same captions (tokens computed on the fly).
    folder = tmp_path / "images"
    folder.mkdir()
    for k in keys:
        images[k].save(folder / f"{k}.png")
    out = tmp_path / "captions.jsonl"
    assert caption_main(["--model", str(model), str(folder), "--output", str(out), "--device", "cpu",
                         "--no_progress", "--max_new_tokens", "12", "--clip_model", tiny_clip]) == 0
    rows = {Path(r["key"]).stem: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
    assert [rows[k] for k in keys] == from_tokens


# --- the scenes dataset -------------------------------------------------------------------
def test_scene_captions_parse_back_and_wrong_ones_are_caught():
    from prefixcap.demo.scenes import SceneConfig, generate_samples, score_caption, score_captions, scene_vocabulary

    cfg = SceneConfig(num_train=60, num_test=60)
    vocab = scene_vocabulary(cfg)
    train = list(generate_samples(cfg, "train"))
    test = list(generate_samples(cfg, "test"))
    scores = score_captions([c for s in train for c in s.captions], [s.scene for s in train for _ in s.captions], vocab)
    assert all(v == 1.0 for v in scores.values())  # every generated wording scores fully right
    held = set(cfg.held_out)
    assert not any((o.colour, o.shape) in held for s in train for o in s.scene.objects)
    assert any(s.scene.held_out for s in test) and any(not s.scene.held_out for s in test)
    scene = train[0].scene
    a, b = scene.objects[0], scene.objects[1]
    from prefixcap.demo.scenes import relation

    true_rel = relation(a, b)
    wrong_rel = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[true_rel]
    count = {2: "two", 3: "three"}[len(scene.objects)]
    good = score_caption(f"{count} shapes: a {a.name} {true_rel} a {b.name}", scene, vocab)
    bad = score_caption(f"{count} shapes: a {a.name} {wrong_rel} a {b.name}", scene, vocab)
    assert good["clauses"] == [(true_rel, True)] and bad["clauses"] == [(wrong_rel, False)]
    assert not bad["relations"] and not bad["all"]
    assert good["relations"] == (len(scene.objects) == 2)  # a 3-object scene needs two clauses


def test_evaluate_on_a_preprocessed_dataset_feeds_a_token_model_its_stored_tokens(token_data, tmp_path, tiny_clip,
                                                                                 capsys):
    from prefixcap.caption.captioner import Captioner
    from prefixcap.evaluate.cli import main as evaluate_main

    _, data_dir = token_data
    assert train_main(_train_argv(data_dir, tmp_path / "m", "transformer_tokens", "--epochs", "2", "--lr", "1e-2",
                                  "--save_every_steps", "1000")) == 0
    model = tmp_path / "m" / "demo_model_final.ckpt"
    argv = ["--model", str(model), "--dataset", str(data_dir), "--metrics", "bleu", "--no_clipscore",
            "--tokenizer", "simple", "--device", "cpu", "--max_new_tokens", "8", "--output_dir", str(tmp_path / "ev")]
    assert evaluate_main(argv) == 0
    preds = {r["key"]: r["caption"] for r in map(json.loads, (tmp_path / "ev" / "predictions.jsonl").open())}
    data = load_preprocessed(data_dir)
    keys = [data.image(i)[0] for i in range(data.num_images)]
    cap = Captioner.from_pretrained(model, clip_model=tiny_clip)
    stored = np.stack([data.image_patch_tokens(i) for i in range(data.num_images)])  # (12, N, C)
    assert preds == dict(zip(keys, cap.caption_embeddings(stored, max_new_tokens=8)))
    assert '"caption_input": "patch tokens"' in (tmp_path / "ev" / "metrics.json").read_text()


def test_evaluate_refuses_a_token_model_on_pooled_only_data(tmp_path, tiny_clip, tiny_gpt2, capsys):
    from prefixcap.evaluate.cli import main as evaluate_main
    from prefixcap.model import CaptionConfig, CaptionModel

    simple_webdataset(tmp_path / "wds", num_tars=1, per_tar=2, size=SIZE)
    assert preprocess_main(_pre_args(tmp_path / "wds", tmp_path / "pre", tiny_clip, tiny_gpt2)) == 0
    model = CaptionModel(CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2,
                                       mapping=_token_cfg("transformer_tokens")))
    model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    code = evaluate_main(["--model", str(tmp_path / "m"), "--dataset", str(tmp_path / "pre"), "--no_clipscore",
                          "--metrics", "bleu", "--device", "cpu", "--output_dir", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "reads patch tokens, but dataset" in err and "stores only pooled embeddings" in err

