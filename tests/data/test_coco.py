"""One COCO/Karpathy parser: keys agree between readers and references; caption -> evaluate round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prefixcap.caption.cli as caption_cli
import prefixcap.evaluate.references as R
import prefixcap.evaluate.cli as EC
from prefixcap.data.coco import CocoFormatError, load_coco, parse_coco
from prefixcap.data.readers import make_reader
from prefixcap.data.records import ReaderConfig, ReaderOptions

STYLES = ("coco", "karpathy_coco", "karpathy_flickr")


def write_dataset(root: Path, style: str) -> tuple[Path, list[str]]:
    """Three test images (plus, for Karpathy, a train image) in `style`; returns the json and the test keys."""
    sub = "val2014" if style == "karpathy_coco" else ""
    (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"{1000 + i}.jpg" for i in range(4)]
    for i, name in enumerate(names):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 30, 3), dtype=np.uint8)).save(root / sub / name)
    sentences = [[f"a photo number {i}", f"picture {i} of a thing"] for i in range(4)]
    if style == "coco":
        data = {"images": [{"id": 40 + i, "file_name": n} for i, n in enumerate(names[:3])],
                "annotations": [{"image_id": 40 + i, "caption": c} for i in range(3) for c in sentences[i]]}
        keys = ["40", "41", "42"]
    else:
        images = []
        for i, name in enumerate(names):
            img = {"filename": name, "imgid": i, "split": "train" if i == 3 else "test",
                   "sentences": [{"raw": c, "tokens": c.split()} for c in sentences[i]]}
            if style == "karpathy_coco":
                img.update(filepath=sub, cocoid=500 + i)
            images.append(img)
        data = {"images": images, "dataset": "coco" if style == "karpathy_coco" else "flickr30k"}
        keys = ["500", "501", "502"] if style == "karpathy_coco" else names[:3]  # Flickr: no cocoid -> file name
    path = root / f"{style}.json"
    path.write_text(json.dumps(data))
    return path, keys


@pytest.mark.parametrize("style", STYLES)
def test_reader_and_references_key_images_alike(tmp_path, style):
    path, keys = write_dataset(tmp_path, style)
    split = None if style == "coco" else "test"
    reader = make_reader(ReaderConfig([str(path)], "coco", ReaderOptions(coco_split=split)))
    records = list(reader.records(0))  # one unit: fewer images than samples_per_shard
    refs = R.load_references(path, split or "test")
    assert [r.key for r in records] == keys == list(refs.captions)
    for r in records:
        assert Path(r.image).is_file()
        assert refs.captions[r.key] == r.captions


def test_parser_errors_name_the_problem(tmp_path):
    with pytest.raises(CocoFormatError, match="annotation 1 lacks image_id or caption"):
        parse_coco({"images": [], "annotations": [{"image_id": 1, "caption": "x"}, {"caption": "y"}]}, "f.json")
    with pytest.raises(CocoFormatError, match="no image in split 'val'; the file has splits test") as err:
        parse_coco({"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}, "f.json", {"val"})
    assert err.value.bad_split
    with pytest.raises(CocoFormatError, match="neither 'annotations'"):
        parse_coco({"images": [{"id": 1}]}, "f.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        load_coco(bad)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_clip, tiny_gpt2) -> str:
    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel

    torch.manual_seed(0)
    config = CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                           mapping=MappingConfig(prefix_size=16, prefix_length=2), max_token_length=6)
    return str(CaptionModel(config).save_pretrained(tmp_path_factory.mktemp("coco_model") / "model"))


@pytest.mark.parametrize("style", STYLES)
def test_caption_then_evaluate_round_trip(tmp_path, model_dir, style):
    path, keys = write_dataset(tmp_path / "data", style)
    preds = tmp_path / "preds.jsonl"
    split = [] if style == "coco" else ["--coco_split", "test"]
    assert caption_cli.main(["--model", model_dir, str(path), "--input_format", "coco", "--output", str(preds),
                             "--no_progress", *split]) == 0
    assert [json.loads(line)["key"] for line in preds.read_text().splitlines()] == keys
    out = tmp_path / "eval"
    assert EC.main(["--predictions", str(preds), "--references", str(path), "--split", "test", "--metrics",
                   "bleu,cider", "--tokenizer", "simple", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    counts = summary["counts"]
    assert counts["scored"] == 3 and counts["unknown_images"] == 0
    assert counts["reference_images_without_prediction"] == 0
    assert summary["metrics"]["CIDEr"] is not None and summary["metrics"]["Bleu_1"] is not None

    # evaluate --model on the same json (images found beside it, as the reader finds them): the same captions.
    out_model = tmp_path / "eval_model"
    assert EC.main(["--model", model_dir, "--dataset", str(path), "--input_format", "coco", "--split", "test",
                   "--metrics", "bleu", "--tokenizer", "simple", "--output_dir", str(out_model)]) == 0
    per = [json.loads(line) for line in (out_model / "predictions.jsonl").read_text().splitlines()]
    captioned = {json.loads(line)["key"]: json.loads(line)["caption"] for line in preds.read_text().splitlines()}
    assert {p["key"]: p["caption"] for p in per} == captioned
