"""Readers: each input format yields per-image records (all captions of an image together), in a fixed order."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixcap.data.readers import expand_inputs, make_reader
from prefixcap.data.records import InputError, ReaderConfig, ReaderOptions
from prep_helpers import image_bytes, simple_webdataset, write_tar


def all_records(reader):
    return [r for u in range(len(reader.units())) for r in reader.records(u)]


def test_brace_expansion_keeps_order():
    assert expand_inputs("x/{000..002}.tar") == ["x/000.tar", "x/001.tar", "x/002.tar"]
    assert expand_inputs(["a.tar", "b{1,2}.tar"]) == ["a.tar", "b1.tar", "b2.tar"]


def test_webdataset_brace_folder_and_list(tmp_path):
    tars = simple_webdataset(tmp_path / "wds", num_tars=3, per_tar=2)
    by_brace = make_reader(ReaderConfig([str(tmp_path / "wds" / "{000..002}.tar")], "webdataset"))
    by_folder = make_reader(ReaderConfig([str(tmp_path / "wds")], "webdataset"))
    by_list = make_reader(ReaderConfig([str(t) for t in tars], "webdataset"))
    assert by_brace.units() == by_folder.units() == by_list.units() == [str(t) for t in tars]
    records = all_records(by_brace)
    assert [r.key for r in records] == ["0000000", "0000001", "0010000", "0010001", "0020000", "0020001"]
    assert records[0].image == image_bytes(0) and records[0].captions == [b"a photo of a red circle number 0"]


def test_webdataset_missing_keys_metadata_captions_and_truncated_tar(tmp_path):
    meta = json.dumps({"caption": "from json", "other": 1}).encode()
    write_tar(tmp_path / "a.tar", [
        ("k0", {"jpg": image_bytes(0), "json": meta}),
        ("k1", {"json": meta}),  # no image
        ("k2", {"png": image_bytes(1, "PNG"), "json": b"{}"}),  # png key, no caption in json
    ])
    cfg = ReaderConfig([str(tmp_path / "a.tar")], "webdataset",
                       ReaderOptions(wds_image_key="jpg;png", wds_caption_key="caption", wds_caption_in_metadata=True))
    recs = all_records(make_reader(cfg))
    assert [(r.key, r.reason, r.captions) for r in recs] == [
        ("k0", None, ["from json"]), ("k1", "missing_image", ["from json"]), ("k2", None, [])]

    full = write_tar(tmp_path / "b.tar", [(f"s{i}", {"jpg": image_bytes(i, size=(64, 64)), "txt": b"c"})
                                          for i in range(6)])
    data = full.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    recs = all_records(make_reader(ReaderConfig([str(tmp_path / "cut.tar")], "webdataset")))
    assert recs[-1].reason == "truncated_tar"
    good = [r for r in recs if r.reason is None]
    assert 1 <= len(good) < 6 and [r.key for r in good] == [f"s{i}" for i in range(len(good))]


def test_files_reader_groups_and_chunks(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["a", "b", "sub/c"]):
        (root / f"{name}.jpg").write_bytes(image_bytes(i))
        (root / f"{name}.txt").write_text(f"caption {name}")
    (root / "nocap.png").write_bytes(image_bytes(9, "PNG"))
    reader = make_reader(ReaderConfig([str(root)], "files", samples_per_shard=3))
    assert len(reader.units()) == 2 and reader.unit_size(0) == 3 and reader.unit_size(1) == 1
    recs = all_records(reader)
    assert [r.key for r in recs] == ["a", "b", "nocap", "sub/c"]
    assert recs[0].image == str(root / "a.jpg") and recs[0].captions == [b"caption a"]
    assert recs[2].captions == []


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_table_readers_group_rows_per_image(tmp_path, fmt):
    (tmp_path / "img").mkdir()
    for i in range(2):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(image_bytes(i))
    rows = [("img/0.jpg", "first"), ("img/1.jpg", "second"), ("img/0.jpg", "third")]
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        path.write_text("path,text\n" + "".join(f"{p},{c}\n" for p, c in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"path": p, "text": c}) + "\n" for p, c in rows))
    else:
        pq.write_table(pa.table({"path": [p for p, _ in rows], "text": [c for _, c in rows]}), path)
    options = ReaderOptions(image_column="path", caption_column="text")
    reader = make_reader(ReaderConfig([str(path)], fmt, options))
    recs = all_records(reader)
    assert [(r.key, r.captions) for r in recs] == [("img/0", ["first", "third"]), ("img/1", ["second"])]
    assert recs[0].image == str(tmp_path / "img" / "0.jpg")
    with pytest.raises(InputError, match=r"no column 'caption'.*path, text"):
        make_reader(ReaderConfig([str(path)], fmt, ReaderOptions(image_column="path")))


def test_parquet_with_inline_image_bytes(tmp_path):
    path = tmp_path / "inline.parquet"
    pq.write_table(pa.table({"image": [{"bytes": image_bytes(0), "path": None}, {"bytes": image_bytes(1), "path": None}],
                             "caption": ["x", "y"]}), path)
    cfg = ReaderConfig([str(path)], "parquet", ReaderOptions(image_column="image"))
    recs = all_records(make_reader(cfg))
    assert [r.image for r in recs] == [image_bytes(0), image_bytes(1)] and [r.key for r in recs] == ["inline/0", "inline/1"]


def test_coco_captions_json_encodes_each_image_once(tmp_path):
    data = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "caption": f"cap {i}"} for i in range(5)]
            + [{"image_id": 3, "caption": "b cap"}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    cfg = ReaderConfig([str(tmp_path / "captions.json")], "coco", ReaderOptions(image_root="/imgs"))
    recs = all_records(make_reader(cfg))
    assert [(r.key, r.image, len(r.captions)) for r in recs] == [("3", "/imgs/b.jpg", 1), ("7", "/imgs/a.jpg", 5)]


def test_karpathy_split_filter(tmp_path):
    images = [{"filepath": "val2014", "filename": f"{i}.jpg", "cocoid": i, "split": s,
               "sentences": [{"raw": f"s{i}a"}, {"raw": f"s{i}b"}]}
              for i, s in enumerate(["train", "restval", "val", "test"])]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    cfg = ReaderConfig([str(tmp_path / "dataset_coco.json")], "coco", ReaderOptions(coco_split="train,restval"))
    recs = all_records(make_reader(cfg))
    assert [(r.key, r.captions) for r in recs] == [("0", ["s0a", "s0b"]), ("1", ["s1a", "s1b"])]
    assert recs[0].image == str(tmp_path / "val2014" / "0.jpg")
    with pytest.raises(InputError, match="no image in split 'nope'.*restval, test, train, val.*--coco_split"):
        make_reader(ReaderConfig([str(tmp_path / "dataset_coco.json")], "coco", ReaderOptions(coco_split="nope")))


def test_embeddings_reader(tmp_path):
    (tmp_path / "img_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    emb = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float16)
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", emb)
    pq.write_table(pa.table({"image_path": ["a", "b", "c"], "caption": ["x", "y", "z"]}),
                   tmp_path / "metadata" / "metadata_0.parquet")
    reader = make_reader(ReaderConfig([str(tmp_path)], "embeddings"))
    recs = all_records(reader)
    assert reader.dim == 8 and [r.key for r in recs] == ["a", "b", "c"] and recs[1].captions == ["y"]
    np.testing.assert_array_equal(recs[2].embedding, emb[2].astype(np.float32))
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", emb[:2])
    with pytest.raises(InputError, match="one embedding row per metadata row"):
        make_reader(ReaderConfig([str(tmp_path)], "embeddings"))


def test_bad_arguments_fail_at_once(tmp_path):
    with pytest.raises(InputError, match="unknown --input_format 'zip'"):
        make_reader(ReaderConfig([str(tmp_path)], "zip"))
    with pytest.raises(InputError, match="does not exist"):
        make_reader(ReaderConfig([str(tmp_path / "missing" / "{0..2}.tar")], "webdataset"))
    with pytest.raises(InputError, match="holds no .tar files"):
        make_reader(ReaderConfig([str(tmp_path)], "webdataset"))
    with pytest.raises(InputError, match="not an embeddings folder"):
        make_reader(ReaderConfig([str(tmp_path)], "embeddings"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_path": "a.jpg", "caption": "x"}\nnot json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2 is not valid JSON"):
        make_reader(ReaderConfig([str(bad)], "jsonl"))


def test_reader_flags_parse_to_the_same_options_in_every_cli():
    from prefixcap.caption import cli as caption_cli
    from prefixcap.evaluate import cli as evaluate_cli
    from prefixcap.preprocess import cli as preprocess_cli
    from prefixcap.data.reader_args import READER_FLAGS

    shared = ["--wds_image_key", "png;jpg", "--image_column", "path", "--caption_column", "text",
              "--key_column", "id"]
    captions_from = ["--wds_caption_key", "caps", "--wds_caption_in_metadata"]  # preprocess and evaluate
    files_from = ["--cache_path", "/tmp/cache", "--image_root", "/imgs", "--coco_split", "test"]  # preprocess, caption
    pre = preprocess_cli.parse_config(["--input_dataset", "x.tar", *shared, *captions_from, *files_from]).reader
    parser = caption_cli.build_parser()
    cap = caption_cli.job_from_args(parser, parser.parse_args(["--model", "m", "x.tar", *shared, *files_from]))
    ev = evaluate_cli.config_from_args(evaluate_cli.build_parser().parse_args(["--model", "m", *shared, *captions_from]))
    expected = ReaderOptions(wds_image_key="png;jpg", wds_caption_key="caps", wds_caption_in_metadata=True,
                             cache_path="/tmp/cache", image_column="path", caption_column="text", key_column="id",
                             image_root="/imgs", coco_split="test")
    assert pre == expected
    assert cap.inputs.reader == ReaderOptions(**{**vars(expected), "wds_caption_key": "txt",
                                                 "wds_caption_in_metadata": False})
    assert ev.reader == ReaderOptions(**{**vars(expected), "cache_path": None, "image_root": None, "coco_split": None})

    # Defaults: what each command has always had (caption reads no caption column unless asked).
    assert preprocess_cli.parse_config(["--input_dataset", "x"]).reader == ReaderOptions()
    assert evaluate_cli.config_from_args(evaluate_cli.build_parser().parse_args(["--model", "m"])).reader == ReaderOptions()
    plain = caption_cli.job_from_args(parser, parser.parse_args(["--model", "m", "x"])).inputs.reader
    assert plain == ReaderOptions(caption_column=None)
    assert preprocess_cli.parse_config(["--input_dataset", "x", "--wds_caption_in_metadata", "false"]).reader \
        .wds_caption_in_metadata is False
    # One help text per flag, wherever it is offered.
    for build in (preprocess_cli.build_parser, caption_cli.build_parser, evaluate_cli.build_parser):
        helps = {a.dest: a.help for a in build()._actions if a.dest in READER_FLAGS}
        assert helps and all(helps[k] == READER_FLAGS[k][1] for k in helps)
