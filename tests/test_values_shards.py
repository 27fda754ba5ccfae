"""Resume sees only complete shards: temporary files left by an interrupted atomic write are ignored."""

from __future__ import annotations

import json

import numpy as np

from prefixcap.data.shards import (
    SHARD_DIR,
    PreprocessedDataset,
    ShardContent,
    atomic_write_json,
    completed_shards,
    write_shard,
)


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
