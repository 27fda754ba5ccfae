"""Retrieval-augmented training and captioning: the prompt's tokens, the masked loss by value, the prompts a
run stores, generation with left-padded prompts, save/load, another datastore, and the bad-input refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_data import make_dataset

from prefixcap.cli import main
from prefixcap.retrieval.prompt import PROMPT_FORMAT, RetrievalSettings, format_prompt, prompt_tokens, prompted_targets

TEXTS = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")
         for p in ("left", "top right corner of the picture")]  # 18 distinct captions of two lengths
NUM_IMAGES, PER_IMAGE, K = 18, 2, 3


def _datastore_input(path: Path) -> Path:
    """The captions of make_dataset's images, keyed as its images are."""
    with path.open("w") as f:
        for i in range(NUM_IMAGES):
            for j in range(PER_IMAGE):
                f.write(json.dumps({"image_path": f"img{i:05d}.jpg", "key": f"img{i:05d}",
                                    "caption": TEXTS[(i * PER_IMAGE + j) % len(TEXTS)]}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_gpt2, tiny_clip) -> dict:
    tmp = tmp_path_factory.mktemp("retrieval")
    data = make_dataset(tmp / "data", tiny_gpt2, num_images=NUM_IMAGES, captions_per_image=PER_IMAGE, captions=TEXTS,
                        prefix_length=K, manifest_overrides={"clip_model": tiny_clip})
    caps = _datastore_input(tmp / "caps.jsonl")
    base = ["build", "--clip_model", tiny_clip, "--no_progress"]
    assert main(["datastore", *base, "--input_dataset", str(caps), "--input_format", "jsonl", "--key_column", "key",
                 "--output_dir", str(tmp / "ds")]) == 0
    other = tmp / "other.txt"
    other.write_text("a purple cross at the top\na orange star at the bottom\n")
    assert main(["datastore", *base, "--input_dataset", str(other), "--input_format", "text",
                 "--output_dir", str(tmp / "ds_other")]) == 0
    out = tmp / "run"
    assert main(["train", "--data_dir", str(data), "--output_dir", str(out), "--datastore", str(tmp / "ds"),
                 "--retrieval_k", "2", "--epochs", "1", "--batch_size", "8", "--num_workers", "0",
                 "--warmup_steps", "0", "--lr", "1e-3", "--gpu_devices", "cpu", "--save_every_epochs", "0",
                 "--prefix_length", str(K)]) == 0
    return {"tmp": tmp, "data": data, "ds": tmp / "ds", "ds_other": tmp / "ds_other", "run": out,
            "model": out / "demo_model_final.ckpt"}


def test_prompt_text_and_tokens(tiny_gpt2):
    from prefixcap.model.language_models import load_tokenizer

    assert format_prompt(["a red circle.", " a blue square "]) == \
        "Similar images show: a red circle. a blue square. This image shows"
    tok = load_tokenizer(tiny_gpt2)
    ids = prompt_tokens(tok, ["a red circle", "a blue square"], RetrievalSettings(k=2))
    assert tok.decode(ids) == "Similar images show: a red circle. a blue square. This image shows"
    cut = prompt_tokens(tok, ["a red circle on the left side of the picture"], RetrievalSettings(max_caption_tokens=3))
    assert len(cut) < len(prompt_tokens(tok, ["a red circle on the left side of the picture"], RetrievalSettings()))


def test_prompt_tokens_are_masked_out_of_the_loss(tiny_gpt2):
    """model(emb, tokens, mask, target_mask) against the loss computed by hand, row by row, without padding."""
    from prefixcap.model.captioning import CaptionModel
    from prefixcap.model.config import CaptionConfig
    from prefixcap.model.mapping import MappingConfig

    torch.manual_seed(0)
    model = CaptionModel(CaptionConfig(language_model=tiny_gpt2, mapping=MappingConfig(prefix_length=K, prefix_size=16)))
    model.eval()
    prompts, captions = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]]
    tokens, mask, target = (torch.from_numpy(a) for a in prompted_targets(prompts, captions))
    emb = torch.randn(2, 16)
    got = model(emb, tokens, mask, target)
    losses = []
    with torch.no_grad():
        prefix = model.prefix(emb)  # (B, K, D)
        for i, (p, c) in enumerate(zip(prompts, captions)):
            ids = torch.tensor(p + c)
            inputs = torch.cat((prefix[i], model.lm.get_input_embeddings()(ids)))[None]  # (1, K+P+C, D)
            logits = model.lm(inputs_embeds=inputs).logits[0]  # (K+P+C, V)
            first = K + len(p) - 1  # the position that predicts the first caption token
            losses.append(F.cross_entropy(logits[first:first + len(c)], torch.tensor(c), reduction="sum"))
    expected = sum(losses) / sum(len(c) for c in captions)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)
    # Not the loss with the prompt counted as targets.
    assert abs(float(model(emb, tokens, mask).detach()) - float(expected)) > 1e-3


def test_training_records_retrieval_and_stores_prompts_without_own_captions(setup, tiny_gpt2):
    from prefixcap import load_preprocessed
    from prefixcap.model.language_models import load_tokenizer
    from prefixcap.retrieval.datastore import Datastore, Retriever
    from prefixcap.retrieval.training import image_prompts

    config = json.loads((setup["model"] / "config.json").read_text())
    assert config["retrieval"] == {"k": 2, "prompt_format": PROMPT_FORMAT, "datastore": str(setup["ds"].resolve()),
                                   "max_caption_tokens": 24}
    stored = setup["run"] / "retrieval" / "train"
    offsets = np.fromfile(stored / "offsets.i64", np.int64)
    flat = np.fromfile(stored / "tokens.i32", np.int32)
    data = load_preprocessed(setup["data"])
    tok = load_tokenizer(tiny_gpt2)
    store = Datastore(setup["ds"])
    assert len(offsets) == data.num_images + 1
    for i in range(data.num_images):
        text = tok.decode(flat[offsets[i]:offsets[i + 1]].tolist())
        key, emb = data.image(i)
        # The stored prompt is exactly the two nearest captions of other images.
        hits = [j for j in store.search(emb[None], k=len(store))[0] if store.key(j) != key][:2]
        assert text == format_prompt([store.caption(j) for j in hits])
    again = image_prompts(Retriever(store, RetrievalSettings(k=2), tok), data, progress=False)
    assert [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(data.num_images)] == again


def test_left_padded_prompts_generate_as_each_row_alone(setup):
    """A batch whose prompts differ in length captions each image exactly as a batch of one does."""
    from prefixcap.caption.captioner import Captioner

    cap = Captioner.from_pretrained(setup["model"])
    # Queries next to short and long captions (the datastore's own vectors), so the prompts' lengths differ.
    emb = 3 * np.fromfile(setup["ds"] / "embeddings.f32", np.float32).reshape(-1, 16)[[0, 1, 5, 6]]
    prompts = cap.retriever.prompts(emb)
    assert len({len(p) for p in prompts}) > 1, "the test needs prompts of different lengths"
    original = emb.copy()
    batched = cap.caption_embeddings(emb, max_new_tokens=6)
    np.testing.assert_array_equal(emb, original)  # retrieval normalises a copy, never the caller's embeddings
    alone = [cap.caption_embeddings(e[None], max_new_tokens=6)[0] for e in emb]
    assert batched == alone
    beams = cap.caption_embeddings(emb, max_new_tokens=6, num_beams=3)
    assert beams == [cap.caption_embeddings(e[None], max_new_tokens=6, num_beams=3)[0] for e in emb]


def test_save_load_and_another_datastore(setup, tmp_path):
    from prefixcap.caption.captioner import Captioner
    from prefixcap.model.captioning import CaptionModel

    cap = Captioner.from_pretrained(setup["model"])
    assert cap.retriever.datastore.path == setup["ds"].resolve() and cap.retriever.settings.k == 2
    emb = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)).numpy()
    before = cap.caption_embeddings(emb, max_new_tokens=6)
    CaptionModel.from_pretrained(setup["model"]).save_pretrained(tmp_path / "copy")
    copy = Captioner.from_pretrained(tmp_path / "copy")
    assert copy.config.retrieval == cap.config.retrieval
    assert copy.caption_embeddings(emb, max_new_tokens=6) == before
    other = Captioner.from_pretrained(setup["model"], datastore=str(setup["ds_other"]))
    assert other.retriever.datastore.path == setup["ds_other"]
    assert all("purple" in t or "orange" in t for t in map(other.tokenizer.decode, other.retriever.prompts(emb)))
    assert other.retriever.prompts(emb) != cap.retriever.prompts(emb)


def test_same_captions_from_images_and_from_embeddings(setup):
    from PIL import Image

    from prefixcap.caption.captioner import Captioner

    cap = Captioner.from_pretrained(setup["model"])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]
    from_images = cap.caption(images, max_new_tokens=6)
    embeddings = cap.encode_pixels(cap.load_pixels(images))  # (3, C)
    assert cap.caption_embeddings(embeddings, max_new_tokens=6) == from_images


def _caption_cli(setup, tmp_path, *extra: str) -> list[str]:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    return ["caption", "--model", str(setup["model"]), str(tmp_path / "red.png"), "--output",
            str(tmp_path / "out.jsonl"), "--no_progress", "--max_new_tokens", "4", *extra]


def test_caption_cli_with_a_datastore(setup, tmp_path):
    assert main(_caption_cli(setup, tmp_path, "--datastore", str(setup["ds_other"]))) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("case", ["other_width", "missing", "missing_index", "not_a_retrieval_model"])
def test_bad_datastore_for_caption_gets_one_line_and_exit_2(setup, tmp_path, tiny_dir, case, capsys):
    import shutil

    from prefixcap.demo.tiny_models import build_tiny_clip

    if case == "other_width":
        clip8 = str(build_tiny_clip(tiny_dir / "clip8", projection_dim=8))
        text = tmp_path / "t.txt"
        text.write_text("a red circle\n")
        assert main(["datastore", "build", "--input_dataset", str(text), "--input_format", "text",
                     "--clip_model", clip8, "--output_dir", str(tmp_path / "ds8"), "--no_progress"]) == 0
        store, needle = tmp_path / "ds8", "8-d CLIP embeddings"
    elif case == "missing":
        store, needle = tmp_path / "nope", "does not exist"
    elif case == "missing_index":
        store, needle = tmp_path / "broken", "index.faiss is missing"
        shutil.copytree(setup["ds"], store)
        (store / "index.faiss").unlink()
    else:
        store, needle = setup["ds"], "trained without retrieval"
    argv = _caption_cli(setup, tmp_path, "--datastore", str(store))
    if case == "not_a_retrieval_model":
        plain = tmp_path / "plain"
        assert main(["train", "--data_dir", str(setup["data"]), "--output_dir", str(plain), "--epochs", "1",
                     "--batch_size", "16", "--num_workers", "0", "--gpu_devices", "cpu", "--only_prefix",
                     "--save_every_epochs", "0", "--prefix_length", str(K)]) == 0
        argv[2] = str(plain / "demo_model_final.ckpt")
    capsys.readouterr()
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert rc == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_serve_with_a_datastore(setup):
    from fastapi.testclient import TestClient
    from PIL import Image

    from prefixcap.caption.captioner import Captioner
    from prefixcap.serve.app import create_app
    from prefixcap.serve.config import ServeConfig

    cap = Captioner.from_pretrained(setup["model"], datastore=str(setup["ds_other"]))
    images = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    expected = cap.caption(images, max_new_tokens=5)
    buffers = []
    for image in images:
        buf = __import__("io").BytesIO()
        image.save(buf, "PNG")
        buffers.append(buf.getvalue())
    config = ServeConfig(model=str(setup["model"]), datastore=str(setup["ds_other"]), warmup=False)
    with TestClient(create_app(cap, config), base_url="http://localhost") as client:
        info = client.get("/v1/model").json()["retrieval"]
        assert info == {"k": 2, "prompt_format": PROMPT_FORMAT, "datastore": "ds_other", "captions": 2}
        r = client.post("/v1/captions", files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(buffers)],
                        data={"max_new_tokens": "5"})
        assert r.status_code == 200, r.text
        assert [res["caption"] for res in r.json()["results"]] == expected


def test_evaluate_and_recaption_with_another_datastore(setup, tmp_path):
    """evaluate --model and re-captioning into --output_dir take --datastore (and record it)."""
    from prefixcap import load_preprocessed
    from prefixcap.caption.captioner import Captioner

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(setup["model"]), "--dataset", str(setup["data"]), "--datastore",
                 str(setup["ds_other"]), "--metrics", "bleu", "--no_clipscore", "--tokenizer", "simple",
                 "--max_new_tokens", "5", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["settings"]["datastore"] == str(setup["ds_other"])
    data = load_preprocessed(setup["data"])
    emb = np.stack([data.image(i)[1] for i in range(data.num_images)])
    cap = Captioner.from_pretrained(setup["model"], datastore=str(setup["ds_other"]))
    assert main(["caption", "--model", str(setup["model"]), str(setup["data"]), "--datastore", str(setup["ds_other"]),
                 "--output_dir", str(tmp_path / "recap"), "--no_progress", "--max_new_tokens", "5"]) == 0
    rows = [json.loads(line) for f in sorted((tmp_path / "recap").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert sorted(r["caption"] for r in rows) == sorted(cap.caption_embeddings(emb, max_new_tokens=5))
    settings = json.loads(next((tmp_path / "recap").glob("*settings*.json")).read_text())
    assert settings["datastore"] == str(setup["ds_other"].resolve())
