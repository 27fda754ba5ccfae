"""Resume sees only complete shards: temporary files left by an interrupted atomic write are ignored."""

from __future__ import annotations

import json

import numpy as np

from prefixcap.data.shards import (
    SHARD_DIR,
    PreprocessedDataset,
    ShardContent,
    completed_shards,
    write_shard,
)
from prefixcap.runs import atomic_write_json


def _content(seed: int) -> ShardContent:
    return ShardContent(keys=[f"k{seed}"], embeddings=np.full((1, 4), seed, np.float32), image_rows=[0],
                        captions=[f"caption {seed}"], tokens=[[seed, 0]])


def test_planted_temp_files_are_not_counted_as_finished_shards(tmp_path):
    write_shard(tmp_path, "00000", _content(0), {"records": 1})
    write_shard(tmp_path, "00002", _content(2), {"records": 1})
    shards = tmp_path / SHARD_DIR
    stats = json.dumps({"name": "00001", "num_images": 1, "num_captions": 1, "embedding_dim": 4})
    # What an atomic write killed before its rename leaves behind (mkstemp prefix ".{name}.", suffix ".tmp"),
    # with complete-looking content, plus the bare names other writers use.
    (shards / ".00001.json.a1b2c3.tmp").write_text(stats)
    (shards / ".00001.json.tmp").write_text(stats)
    (shards / "00001.json.tmp").write_text(stats)
    (shards / ".00001.images.arrow.x9.tmp").write_bytes(b"partial")
    (shards / ".00003.tmp").write_text(stats)
    done = completed_shards(tmp_path)
    assert list(done) == ["00000", "00002"]
    assert done["00000"]["num_captions"] == 1 and done["00002"]["records"] == 1
    # Opening an unfinished dataset (no manifest yet) reads exactly those shards.
    ds = PreprocessedDataset(tmp_path, require_complete=False)
    assert len(ds) == 2 and [ds[i].key for i in range(2)] == ["k0", "k2"]


def test_completed_shards_are_sorted_by_name_and_empty_folder_is_empty(tmp_path):
    assert completed_shards(tmp_path) == {}
    for name in ("00010", "00002", "00007"):
        write_shard(tmp_path, name, _content(int(name)), {})
    assert list(completed_shards(tmp_path)) == ["00002", "00007", "00010"]


def test_atomic_write_leaves_no_temp_file_and_replaces_content(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}


def test_shard_files_have_the_exact_schema_and_stats(tmp_path):
    import pyarrow as pa
    import pytest

    content = ShardContent(keys=["a", "b"], embeddings=np.arange(8, dtype=np.float32).reshape(2, 4),
                           image_rows=[1, 0, 1], captions=["x", "y", "z"], tokens=[[5, 0], [6, 7, 0], [8, 0]])
    stats_path = write_shard(tmp_path, "00003", content, {"records": 2})
    assert json.loads(stats_path.read_text()) == {"records": 2, "name": "00003", "num_images": 2, "num_captions": 3,
                                                  "embedding_dim": 4}
    shards = tmp_path / SHARD_DIR
    images = pa.ipc.open_file(pa.memory_map(str(shards / "00003.images.arrow"))).read_all()
    captions = pa.ipc.open_file(pa.memory_map(str(shards / "00003.captions.arrow"))).read_all()
    assert images.schema == pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float16(), 4))])
    assert captions.schema == pa.schema([("image_row", pa.int32()), ("caption", pa.string()),
                                         ("tokens", pa.list_(pa.int32()))])
    assert images.column("embedding").to_pylist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert captions.column("tokens").to_pylist() == [[5, 0], [6, 7, 0], [8, 0]]
    with pytest.raises(AssertionError, match="^one embedding per image key$"):
        write_shard(tmp_path, "00004", ShardContent(["a"], np.zeros((2, 4)), [], [], []), {})


def test_atomic_write_renames_a_hidden_tmp_from_the_same_folder(tmp_path, monkeypatch):
    import os

    from prefixcap import runs as runs_module

    renames = []
    real = os.replace

    def recording(src, dst):
        renames.append((os.fspath(src), os.fspath(dst)))
        real(src, dst)

    monkeypatch.setattr(runs_module.os, "replace", recording)
    target = tmp_path / "deep" / "er" / "stats.json"  # missing parent folders are created
    atomic_write_json(target, {"k": [1, 2]})
    assert json.loads(target.read_text()) == {"k": [1, 2]}
    (src, dst), = renames
    assert dst == str(target)
    src_name = os.path.basename(src)
    # Same folder (a rename never crosses file systems), and a name completed_shards never counts.
    assert os.path.dirname(src) == str(target.parent)
    assert src_name.startswith(".stats.json.") and src_name.endswith(".tmp")


def test_patch_tokens_are_stored_flat_in_float16_with_their_shape(tmp_path):
    import pyarrow as pa
    import pytest

    tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 8  # (N_images, N, C)
    content = ShardContent(keys=["a", "b"], embeddings=np.ones((2, 4), np.float32), image_rows=[0, 1],
                           captions=["x", "y"], tokens=[[1, 0], [2, 0]], patch_tokens=tokens)
    stats = json.loads(write_shard(tmp_path, "00000", content, {}).read_text())
    assert stats["patch_tokens_shape"] == [3, 4]
    images = pa.ipc.open_file(pa.memory_map(str(tmp_path / SHARD_DIR / "00000.images.arrow"))).read_all()
    assert images.schema.field("patch_tokens").type == pa.list_(pa.float16(), 12)
    stored = np.array(images.column("patch_tokens").to_pylist(), np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(stored, tokens.astype(np.float16).astype(np.float32))
    wrong = ShardContent(keys=["a", "b"], embeddings=np.ones((2, 4)), image_rows=[], captions=[], tokens=[],
                         patch_tokens=np.zeros((3, 3, 4)))
    with pytest.raises(AssertionError, match="^one token set per image key$"):
        write_shard(tmp_path, "00001", wrong, {})


def test_json_files_are_sorted_and_indented_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import pytest

    from prefixcap import runs as runs_module

    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1]})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'

    def no_rename(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(runs_module.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(tmp_path / "n.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # the temporary file is removed
