"""Shard writing, completion rule, manifest assembly and the settings check used by the preprocess runner."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefixcap.data.shards import SHARD_DIR, Manifest, ShardContent, completed_shards, load_preprocessed, write_shard
from prefixcap.preprocess.progress import (
    check_settings, parse_shard_name, rank_marker, shard_name, try_write_manifest, unit_progress,
)
from prefixcap.runs import SettingsMismatchError, atomic_write_json


def _content(n_images: int, seed: int, dim: int = 4) -> ShardContent:
    rng = np.random.default_rng(seed)
    rows = [i for i in range(n_images) for _ in range(2)]  # two captions per image
    return ShardContent(
        keys=[f"k{seed}-{i}" for i in range(n_images)],
        embeddings=rng.normal(size=(n_images, dim)).astype(np.float32),
        image_rows=rows,
        captions=[f"caption {seed} {r} {j}" for j, r in enumerate(rows)],
        tokens=[[seed, r, j, 0] for j, r in enumerate(rows)],
    )


def test_shard_names_sort_in_input_order():
    names = [shard_name(u, p) for u in (0, 2, 10) for p in (0, 1, 12)]
    assert sorted(names) == names
    assert parse_shard_name(shard_name(12, 3)) == (12, 3)
    assert parse_shard_name("r000-000001") is None


def test_manifest_covers_complete_shards_only(tmp_path):
    header = Manifest(embedding_dim=4, clip_model="x", input_format="files")
    write_shard(tmp_path, shard_name(0, 0), _content(2, 0), {"records": 3, "last": True, "skipped": {"corrupt": 1}})
    write_shard(tmp_path, shard_name(1, 0), _content(3, 1), {"records": 3, "last": False, "num_truncated": 2})
    write_shard(tmp_path, shard_name(1, 1), _content(0, 2), {"records": 0, "last": True})  # empty last part
    # A half-written shard: Arrow files without the stats json is not complete.
    write_shard(tmp_path, shard_name(2, 0), _content(1, 3), {"records": 1, "last": True})
    (tmp_path / SHARD_DIR / f"{shard_name(2, 0)}.json").unlink()
    assert list(completed_shards(tmp_path)) == [shard_name(0, 0), shard_name(1, 0), shard_name(1, 1)]

    assert try_write_manifest(tmp_path, 2, header) is None  # no rank has finished yet
    atomic_write_json(rank_marker(tmp_path, 0, 2), {})
    assert try_write_manifest(tmp_path, 2, header) is None
    atomic_write_json(rank_marker(tmp_path, 1, 2), {})
    manifest = try_write_manifest(tmp_path, 2, header)
    assert manifest.to_dict() == json.loads((tmp_path / "manifest.json").read_text())
    assert Manifest.read(tmp_path) == manifest
    assert manifest.num_images == 5 and manifest.num_captions == 10 and manifest.world_size == 2
    assert manifest.skipped == {"corrupt": 1} and manifest.num_skipped == 1 and manifest.num_truncated == 2
    assert [s.name for s in manifest.shards] == [shard_name(0, 0), shard_name(1, 0)]  # empty one left out

    ds = load_preprocessed(tmp_path)
    assert len(ds) == 10 and ds.num_images == 5
    first = _content(2, 0)
    assert ds[1].key == "k0-0" and ds[1].caption == first.captions[1] and ds[1].tokens.tolist() == first.tokens[1]
    np.testing.assert_array_equal(ds[4].embedding, _content(3, 1).embeddings[0].astype(np.float16).astype(np.float32))
    assert ds.references()[0] == first.captions[:2]


def test_unit_progress_counts_contiguous_parts():
    done = {shard_name(0, 0): {"records": 5}, shard_name(0, 1): {"records": 2, "last": True},
            shard_name(3, 0): {"records": 5}, shard_name(3, 2): {"records": 5}}
    progress = unit_progress(done)
    assert [p["records"] for p in progress[0]] == [5, 2] and len(progress[3]) == 1


def test_settings_rerun_with_other_settings_is_refused(tmp_path):
    check_settings(tmp_path, {"clip_model": "a", "max_token_length": 8})
    check_settings(tmp_path, {"clip_model": "a", "max_token_length": 8})  # same settings: resume
    with pytest.raises(SettingsMismatchError, match=r"max_token_length: folder has 8, this run asks for 16"):
        check_settings(tmp_path, {"clip_model": "a", "max_token_length": 16})


def test_atomic_writes_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    import os

    atomic_write_json(tmp_path / "m.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "m.json").st_mode & 0o777 == 0o666 & ~mask


def test_manifest_keeps_unknown_keys_and_refuses_a_newer_format(tmp_path):
    from prefixcap.data.shards import FORMAT_VERSION

    data = Manifest(clip_model="c", embedding_dim=8).to_dict()
    data["written_by_a_newer_tool"] = {"x": 1}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    m = Manifest.read(tmp_path)
    assert m.clip_model == "c" and m.embedding_dim == 8 and m.extra == {"written_by_a_newer_tool": {"x": 1}}
    assert m.to_dict() == data  # a rewrite keeps what this version does not know
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version"):
        Manifest.read(tmp_path)


def test_manifest_answers_subscripts_and_get_as_the_dict_it_was(tmp_path):
    header = Manifest(embedding_dim=4, clip_model="ViT-B/32", input_format="files")
    write_shard(tmp_path, shard_name(0, 0), _content(2, 0), {"records": 2, "last": True})
    atomic_write_json(rank_marker(tmp_path, 0, 1), {})
    try_write_manifest(tmp_path, 1, header)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["written_by_a_newer_tool"] = [1, 2]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    m = load_preprocessed(tmp_path).manifest  # docs/preprocess.md: ds.manifest["clip_model"]
    assert m["clip_model"] == "ViT-B/32" and m["embedding_dim"] == 4 and m["num_images"] == 2
    assert m["num_captions"] == 4 and m["skipped"] == {} and m["patch_tokens"] is None
    assert m["shards"] == [{"name": "u000000-p0000", "num_images": 2, "num_captions": 4}]  # as the json holds them
    assert m["written_by_a_newer_tool"] == [1, 2]  # a key this version does not know
    assert all(m[key] == value for key, value in data.items())
    for absent in ("no_such_key", "extra"):  # "extra" is the dataclass's own bookkeeping, not a json key
        with pytest.raises(KeyError):
            m[absent]
        assert m.get(absent) is None and m.get(absent, 7) == 7
    assert m.get("clip_model") == "ViT-B/32" and m.get("num_images", 0) == 2 and m.get("normalized", True) is False
