"""The datastore: counts, ids <-> captions, CLIP text embeddings by value, resume, append, refusals, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixcap.cli import main
from prefixcap.retrieval.build import DatastoreConfig, build_datastore
from prefixcap.retrieval.datastore import EMBEDDINGS, INDEX, MANIFEST, Datastore, DatastoreError

CAPTIONS = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square")
            for p in ("left", "right")]  # 12 captions, 6 images with 2 each


def write_jsonl(path: Path, captions: list[str] = CAPTIONS) -> Path:
    with path.open("w") as f:
        for i, c in enumerate(captions):
            f.write(json.dumps({"image_path": f"img{i // 2:05d}.jpg", "key": f"img{i // 2:05d}", "caption": c}) + "\n")
    return path


def build(clip: str, inputs: list[str], out: Path, fmt: str = "jsonl", **kwargs):
    from prefixcap.data.records import ReaderOptions

    cfg = DatastoreConfig(inputs=inputs, output_dir=str(out), input_format=fmt, clip_model=clip, progress=False,
                          options=ReaderOptions(key_column="key"), **kwargs)
    return build_datastore(cfg)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip) -> Path:
    tmp = tmp_path_factory.mktemp("ds")
    out = tmp / "ds"
    build(tiny_clip, [str(write_jsonl(tmp / "caps.jsonl"))], out, batch_size=5)
    return out


def test_counts_keys_captions_and_embeddings_by_value(store, tiny_clip):
    from prefixcap.model.encoders import load_encoder

    ds = Datastore(store)
    assert len(ds) == len(CAPTIONS) and ds.manifest.clip_model == tiny_clip and ds.manifest.index_type == "flat"
    assert [ds.caption(i) for i in range(len(ds))] == CAPTIONS
    assert [ds.key(i) for i in range(len(ds))] == [f"img{i // 2:05d}" for i in range(len(CAPTIONS))]
    stored = np.fromfile(store / EMBEDDINGS, np.float32).reshape(len(CAPTIONS), -1)
    expected = load_encoder(tiny_clip).encode_text(CAPTIONS)  # (N, C)
    expected = (expected / expected.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    # Each caption's own embedding finds that caption first (ids and captions line up in the index).
    assert [row[0] for row in ds.search(expected, k=1)] == list(range(len(CAPTIONS)))


def test_search_leaves_out_the_images_own_captions(store):
    ds = Datastore(store)
    queries = np.fromfile(store / EMBEDDINGS, np.float32).reshape(len(CAPTIONS), -1)[::2]  # caption 0 of each image
    own = [f"img{i:05d}" for i in range(len(queries))]
    plain = ds.search(queries, k=3)
    assert all(ds.key(row[0]) == key for row, key in zip(plain, own))  # without exclusion: its own caption first
    before = queries.copy()
    kept = ds.search(queries, k=3, exclude_keys=own)
    np.testing.assert_array_equal(queries, before * 1)  # the caller's array is left as it was
    scaled = 7 * before
    assert ds.search(scaled, k=3, exclude_keys=own) == kept and np.array_equal(scaled, 7 * before)
    assert all(len(row) == 3 and all(ds.key(i) != key for i in row) for row, key in zip(kept, own))
    # Exactly the plain ranking with the own captions removed.
    full = ds.search(queries, k=len(CAPTIONS))
    assert kept == [[i for i in row if ds.key(i) != key][:3] for row, key in zip(full, own)]


def test_interrupted_build_resumes_to_the_same_datastore(tmp_path, tiny_clip, store):
    caps = str(write_jsonl(tmp_path / "caps.jsonl"))
    out = tmp_path / "ds"
    from prefixcap.retrieval.build import BuildInterrupted

    with pytest.raises(BuildInterrupted):  # a stop request at the first safe point (after one batch)
        build_datastore(DatastoreConfig(inputs=[caps], output_dir=str(out), input_format="jsonl", clip_model=tiny_clip,
                                        progress=False, batch_size=5, options=_options()), should_stop=lambda: True)
    assert not (out / MANIFEST).exists()  # nothing usable until the build finished
    with pytest.raises(DatastoreError, match="manifest.json is missing"):
        Datastore(out)
    summary = build(tiny_clip, [caps], out, batch_size=5)
    assert summary.resumed_from == 5 and summary.count == len(CAPTIONS)
    assert (out / EMBEDDINGS).read_bytes() == (store / EMBEDDINGS).read_bytes()
    assert not (out / ".partial").exists()


def _options():
    from prefixcap.data.records import ReaderOptions

    return ReaderOptions(key_column="key")


def test_append_and_refusal_to_mix_clip_models(tmp_path, tiny_clip, tiny_dir, capsys):
    from prefixcap.demo.tiny_models import build_tiny_clip

    caps = str(write_jsonl(tmp_path / "caps.jsonl"))
    out = tmp_path / "ds"
    build(tiny_clip, [caps], out)
    extra = tmp_path / "more.txt"
    extra.write_text("a purple star\n\na orange cross\n")
    summary = build(tiny_clip, [str(extra)], out, fmt="text", append=True)
    ds = Datastore(out)
    assert (summary.count, summary.added, len(ds)) == (len(CAPTIONS) + 2, 2, len(CAPTIONS) + 2)
    assert [ds.caption(i) for i in range(len(ds))] == CAPTIONS + ["a purple star", "a orange cross"]
    before = (out / INDEX).read_bytes()
    other = str(build_tiny_clip(tiny_dir / "clip_other", projection_dim=16, seed=5))
    capsys.readouterr()
    rc = main(["datastore", "build", "--input_dataset", str(extra), "--input_format", "text", "--append",
               "--clip_model", other, "--output_dir", str(out), "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "never mixes CLIP models" in err[0]
    assert (out / INDEX).read_bytes() == before  # untouched


@pytest.mark.parametrize("damage", ["missing_index", "empty", "no_manifest", "no_captions"])
def test_bad_datastores_get_one_line_and_exit_2(tmp_path, tiny_clip, store, damage, capsys):
    import shutil

    out = tmp_path / "ds"
    if damage == "no_captions":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n")
        argv = ["datastore", "build", "--input_dataset", str(empty), "--input_format", "text",
                "--clip_model", tiny_clip, "--output_dir", str(out), "--no_progress"]
    else:
        shutil.copytree(store, out)
        if damage == "missing_index":
            (out / INDEX).unlink()
        elif damage == "empty":
            manifest = json.loads((out / MANIFEST).read_text())
            (out / MANIFEST).write_text(json.dumps({**manifest, "count": 0}))
        else:
            (out / MANIFEST).unlink()
        argv = ["datastore", "info", str(out)]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert {"missing_index": "index.faiss is missing", "empty": "it is empty", "no_manifest": "manifest.json is missing",
            "no_captions": "the text files hold no caption"}[damage] in err[0]


def test_approximate_indexes_find_the_exact_neighbour(tmp_path, tiny_clip, store):
    caps = str(write_jsonl(tmp_path / "caps.jsonl"))
    queries = torch.from_numpy(np.fromfile(store / EMBEDDINGS, np.float32).reshape(len(CAPTIONS), -1))
    for index_type in ("hnsw", "ivf"):
        out = tmp_path / index_type
        build(tiny_clip, [caps], out, index_type=index_type)
        ds = Datastore(out)
        assert ds.manifest.index_type == index_type
        assert [row[0] for row in ds.search(queries.numpy(), k=1)] == list(range(len(CAPTIONS)))
