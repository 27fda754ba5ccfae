"""Hugging Face `datasets` input (--input_format hf_dataset), offline: datasets built locally and saved to disk."""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from prefixcap import load_preprocessed
from prefixcap.data.readers import make_reader
from prefixcap.data.records import InputError, ReaderConfig, ReaderOptions
from prefixcap.preprocess.cli import main as preprocess_main
from prep_helpers import reference_embeddings, run_args


def _pil(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _image_dataset(n: int = 5) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string")),
                                  "id": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [_pil(i) for i in range(n)], "captions": [[f"a picture {i}", f"image number {i}"] for i in range(n)],
         "id": [f"im{i}" for i in range(n)]}, features=features)


def _records(reader) -> list:
    return [r for u in range(len(reader.units())) for r in reader.records(u)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    _image_dataset(5).save_to_disk(str(root / "single"), num_shards=1)
    datasets.DatasetDict({"train": _image_dataset(5), "test": _image_dataset(2)}).save_to_disk(str(root / "dict"))
    _image_dataset(6).save_to_disk(str(root / "sharded"), num_shards=3)
    return root


def test_image_feature_and_caption_lists_from_a_saved_dataset(saved):
    # --image_column / --caption_column left at their table defaults: the dataset's image / captions are found.
    reader = make_reader(ReaderConfig([str(saved / "single")], "hf_dataset", samples_per_shard=2))
    assert reader.units() == [f"{saved / 'single'}[train][0:2]", f"{saved / 'single'}[train][2:4]",
                              f"{saved / 'single'}[train][4:5]"]
    assert [reader.unit_size(u) for u in range(3)] == [2, 2, 1]
    records = _records(reader)
    assert [r.key for r in records] == [f"train/{i}" for i in range(5)]
    for i, r in enumerate(records):
        assert isinstance(r.image, bytes) and r.reason is None
        np.testing.assert_array_equal(_pixels(r.image), np.asarray(_pil(i)))  # lossless: the dataset's pixels
        assert r.captions == [f"a picture {i}", f"image number {i}"]


def test_splits_of_a_dataset_dict(saved):
    path = str(saved / "dict")
    assert len(_records(make_reader(ReaderConfig([path], "hf_dataset")))) == 5  # train by default
    test = _records(make_reader(ReaderConfig([path], "hf_dataset", ReaderOptions(hf_split="test", key_column="id"))))
    assert [r.key for r in test] == ["im0", "im1"]
    with pytest.raises(InputError, match=r"has no split 'val' \(--hf_split\); its splits: train, test"):
        make_reader(ReaderConfig([path], "hf_dataset", ReaderOptions(hf_split="val")))


def test_streaming_units_are_the_shards_and_read_the_same_rows(saved):
    path = str(saved / "sharded")
    streamed = make_reader(ReaderConfig([path], "hf_dataset", ReaderOptions(hf_streaming=True, key_column="id")))
    assert streamed.units() == [f"{path}[train]#shard{i}/3" for i in range(3)]
    assert streamed.unit_size(0) is None
    per_unit = [[r.key for r in streamed.records(u)] for u in range(3)]
    assert all(per_unit) and sum(per_unit, []) == [f"im{i}" for i in range(6)]
    in_place = make_reader(ReaderConfig([path], "hf_dataset", ReaderOptions(key_column="id")))
    a, b = _records(streamed), _records(in_place)
    assert [(r.key, r.image, r.captions) for r in a] == [(r.key, r.image, r.captions) for r in b]


def test_bytes_and_path_columns_string_captions_grouped_by_key(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        _pil(i).save(tmp_path / "imgs" / f"{i}.png")
    ds = datasets.Dataset.from_dict({
        "file": ["0.png", "0.png", "1.png", ""],  # relative to --image_root; an empty path is a missing image
        "blob": [b"x", b"x", b"y", b"z"],
        "text": ["first caption", "second caption", "third caption", "fourth"],
        "img_id": ["a", "a", "b", "c"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    opts = ReaderOptions(image_column="file", caption_column="text", key_column="img_id",
                         image_root=str(tmp_path / "imgs"))
    records = _records(make_reader(ReaderConfig([str(tmp_path / "ds")], "hf_dataset", opts)))
    assert [(r.key, r.captions) for r in records] == [("a", ["first caption", "second caption"]),
                                                      ("b", ["third caption"]), ("c", ["fourth"])]
    assert records[0].image == str(tmp_path / "imgs" / "0.png") and records[2].reason == "missing_image"
    opts = ReaderOptions(image_column="blob", caption_column="text")
    assert [r.image for r in _records(make_reader(ReaderConfig([str(tmp_path / "ds")], "hf_dataset", opts)))] == \
        [b"x", b"x", b"y", b"z"]


def test_bad_inputs_fail_at_once(saved, tmp_path):
    with pytest.raises(InputError, match=r"no column 'picture' \(--image_column\); its columns: image, captions, id"):
        make_reader(ReaderConfig([str(saved / "single")], "hf_dataset", ReaderOptions(image_column="picture")))
    with pytest.raises(InputError, match="does not exist"):
        make_reader(ReaderConfig([str(tmp_path / "nope" / "ds")], "hf_dataset"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        make_reader(ReaderConfig([str(tmp_path / "f.txt")], "hf_dataset"))


def test_hub_id_goes_through_load_dataset(monkeypatch):
    asked = {}

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        asked.update(path=path, name=name, split=split, streaming=streaming)
        return _image_dataset(3).to_iterable_dataset(num_shards=3) if streaming else _image_dataset(3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    opts = ReaderOptions(hf_split="validation", hf_config="2017", hf_streaming=True)
    reader = make_reader(ReaderConfig(["someone/captions"], "hf_dataset", opts))
    assert asked == {"path": "someone/captions", "name": "2017", "split": "validation", "streaming": True}
    assert reader.hub_datasets == ["someone/captions"] and len(reader.units()) == 3
    assert [r.captions[0] for r in _records(reader)] == ["a picture 0", "a picture 1", "a picture 2"]


def test_preprocess_reads_a_saved_dataset(saved, tmp_path, tiny_clip, tiny_gpt2):
    rc = preprocess_main(run_args(saved / "dict", tmp_path / "out", tiny_clip, tiny_gpt2, "--hf_split", "train",
                                  "--key_column", "id", "--batch_size", "2", "--samples_per_shard", "2",
                                  "--num_prepro_workers", "0", fmt="hf_dataset"))
    assert rc == 0
    ds = load_preprocessed(tmp_path / "out")
    assert ds.manifest.num_images == 5 and ds.manifest.num_captions == 10
    assert ds.manifest.input_format == "hf_dataset"
    images = {}
    for i in range(5):
        buf = io.BytesIO()
        _pil(i).save(buf, format="PNG")
        images[f"im{i}"] = buf.getvalue()
    expected = reference_embeddings(tiny_clip, images)
    keys = [ds.image(i)[0] for i in range(ds.num_images)]
    assert keys == [f"im{i}" for i in range(5)]
    for i, key in enumerate(keys):
        np.testing.assert_allclose(ds.image(i)[1], expected[key], rtol=2e-3, atol=2e-3)
    assert sorted(ds.references()[3]) == ["a picture 3", "image number 3"]
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["reader"]["hf_split"] == "train"


def test_caption_and_evaluate_offer_the_flags():
    from prefixcap.caption import cli as caption_cli
    from prefixcap.evaluate import cli as evaluate_cli
    from prefixcap.caption.inputs import FORMATS

    assert "hf_dataset" in FORMATS
    parser = caption_cli.build_parser()
    job = caption_cli.job_from_args(parser, parser.parse_args(["--model", "m", "ds", "--input_format", "hf_dataset",
                                                               "--hf_split", "test", "--hf_streaming"]))
    assert job.inputs.reader.hf_split == "test" and job.inputs.reader.hf_streaming is True
    ev = evaluate_cli.config_from_args(evaluate_cli.build_parser().parse_args(
        ["--model", "m", "--input_format", "hf_dataset", "--hf_config", "2014"]))
    assert ev.reader.hf_config == "2014" and ev.reader.hf_streaming is None
