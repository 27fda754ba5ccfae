"""`prefixcap caption`: one JSON line per input (broken ones included), for every input kind."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from prefixcap.caption.captioner import Captioner
from prefixcap.caption.cli import main
from prefixcap.data.shards import Manifest, ShardContent, ShardEntry, write_shard
from prefixcap.model.mapping import MappingConfig
from prefixcap.model import CaptionConfig, CaptionModel

C = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_clip, tiny_gpt2) -> str:
    torch.manual_seed(0)
    config = CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                           mapping=MappingConfig(prefix_size=C, prefix_length=4), max_token_length=8)
    path = tmp_path_factory.mktemp("cli") / "model"
    CaptionModel(config).save_pretrained(path)  # frozen LM: only referenced, not stored
    return str(path)


@pytest.fixture(scope="module")
def cap(model_dir) -> Captioner:
    return Captioner.from_pretrained(model_dir)


def png_bytes(seed: int, size=(40, 36)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_images_folders_globs_and_broken_files(tmp_path, model_dir, cap):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"good{i}.png").write_bytes(png_bytes(i))
    (folder / "sub" / "nested.png").write_bytes(png_bytes(9))
    (folder / "broken.jpg").write_bytes(png_bytes(5)[:60])  # truncated
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, not listed")
    other = tmp_path / "other"
    other.mkdir()
    for i in range(2):
        (other / f"x{i}.png").write_bytes(png_bytes(20 + i))
    missing = str(tmp_path / "missing.png")
    out = tmp_path / "out" / "captions.jsonl"
    rc = main(["--model", model_dir, str(folder), str(other / "*.png"), missing, "--output", str(out),
               "--batch_size", "2", "--no_progress"])
    assert rc == 0
    rows = read_jsonl(out)
    expected_keys = sorted(str(p) for p in folder.rglob("*") if p.suffix in {".png", ".jpg"})
    expected_keys += sorted(str(p) for p in other.glob("*.png")) + [missing]
    assert [r["key"] for r in rows] == expected_keys  # one line per input, in input order
    errors = {Path(r["key"]).name: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"broken.jpg", "empty.png", "missing.png"}
    assert "truncated" in errors["broken.jpg"] and "empty" in errors["empty.png"]
    assert "not found" in errors["missing.png"]
    good = [r for r in rows if "error" not in r]
    assert len(good) == 6 and all(isinstance(r["caption"], str) for r in good)
    # Same captions as the Python API on the same files.
    assert [r["caption"] for r in good] == cap.caption([r["key"] for r in good])


def test_webdataset_with_a_broken_sample(tmp_path, model_dir, capsys):
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, data in [("a", png_bytes(1)), ("b", b"garbage bytes"), ("c", png_bytes(2))]:
            for ext, payload in [("jpg", data), ("txt", b"a caption")]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    rc = main(["--model", model_dir, str(tar_path), "--no_progress", "--num_beams", "3",
               "--num_return_sequences", "2", "--scores"])
    assert rc == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["key"] for r in rows] == ["a", "b", "c"]
    assert "not_an_image" in rows[1]["error"]
    for r in (rows[0], rows[2]):
        assert len(r["captions"]) == 2 and len(r["scores"]) == 2
        assert r["scores"][0] >= r["scores"][1]
    assert "2 captioned, 1 errors" in captured.err


def test_preprocessed_folder_and_clip_retrieval_embeddings(tmp_path, model_dir, cap):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, C)).astype(np.float16)
    keys = [f"img{i}" for i in range(5)]
    pre = tmp_path / "pre"
    write_shard(pre, "u000000-p0000", ShardContent(keys, emb, [0, 1, 2, 3, 4], ["c"] * 5, [[1, 2]] * 5), {})
    Manifest(embedding_dim=C, shards=[ShardEntry("u000000-p0000", 5, 5)]).write(pre)

    emb_dir = tmp_path / "emb"
    (emb_dir / "img_emb").mkdir(parents=True)
    (emb_dir / "metadata").mkdir()
    np.save(emb_dir / "img_emb" / "img_emb_0.npy", emb[:3])
    pq.write_table(pa.table({"image_path": ["p0.jpg", "p1.jpg", "p2.jpg"]}),
                   emb_dir / "metadata" / "metadata_0.parquet")

    out = tmp_path / "out.jsonl"
    assert main(["--model", model_dir, str(pre), str(emb_dir), "--output", str(out), "--no_progress",
                 "--batch_size", "4"]) == 0
    rows = read_jsonl(out)
    assert [r["key"] for r in rows] == keys + ["p0.jpg", "p1.jpg", "p2.jpg"]
    expected = cap.caption_embeddings(emb.astype(np.float32))
    assert [r["caption"] for r in rows] == expected + expected[:3]


def test_limit_and_input_errors(tmp_path, model_dir, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(png_bytes(i))
    out = tmp_path / "o.jsonl"
    assert main(["--model", model_dir, str(folder), "--limit", "2", "--output", str(out), "--no_progress"]) == 0
    assert len(read_jsonl(out)) == 2
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert main(["--model", model_dir, str(empty), "--no_progress"]) == 2
    assert "holds no image files" in capsys.readouterr().err
    table = tmp_path / "t.parquet"  # a dataset ahead of it (its size unknown until read): still refused first
    pq.write_table(pa.table({"image_path": [str(folder / "0.png")]}), table)
    late = tmp_path / "late.jsonl"
    assert main(["--model", model_dir, str(table), str(empty), "--output", str(late), "--no_progress"]) == 2
    assert "holds no image files" in capsys.readouterr().err and not late.exists()
    with pytest.raises(SystemExit):
        main(["--model", model_dir, str(folder), "--num_return_sequences", "3"])  # needs beams or sampling


def test_parquet_table_without_caption_column(tmp_path, model_dir, cap):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    (tmp_path / "b.png").write_bytes(png_bytes(2))
    pq.write_table(pa.table({"image_path": ["a.png", "gone.png", "b.png"]}), tmp_path / "table.parquet")
    out = tmp_path / "t.jsonl"
    assert main(["--model", model_dir, str(tmp_path / "table.parquet"), "--output", str(out),
                 "--no_progress"]) == 0
    rows = read_jsonl(out)
    assert [r["key"] for r in rows] == ["a", "gone", "b"]
    assert "missing_image" in rows[1]["error"]
    assert [rows[0]["caption"], rows[2]["caption"]] == cap.caption([tmp_path / "a.png", tmp_path / "b.png"])


def test_missing_model_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    # a model that does not load is a runtime error (exit 1), told in one line naming it
    assert main(["--model", str(tmp_path / "no_model"), str(tmp_path / "a.png"), "--no_progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_model" in err[0] and "cannot load --model" in err[0]


def test_every_input_failing_exits_1(tmp_path, model_dir, capsys):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "o.jsonl"
    assert main(["--model", model_dir, str(tmp_path / "bad.png"), str(tmp_path / "gone.png"), "--output", str(out),
                 "--no_progress"]) == 1
    assert [r["key"] for r in read_jsonl(out)] == [str(tmp_path / "bad.png"), str(tmp_path / "gone.png")]
    assert "no input could be captioned" in capsys.readouterr().err


def test_embeddings_of_the_wrong_width_fail_fast_with_one_line(tmp_path, model_dir, capsys):
    emb_dir = tmp_path / "emb"
    (emb_dir / "img_emb").mkdir(parents=True)
    (emb_dir / "metadata").mkdir()
    np.save(emb_dir / "img_emb" / "img_emb_0.npy", np.zeros((3, C + 8), np.float32))
    meta = pa.table({"image_path": ["p0.jpg", "p1.jpg", "p2.jpg"]})
    pq.write_table(meta, emb_dir / "metadata" / "metadata_0.parquet")
    out = tmp_path / "o.jsonl"
    assert main(["--model", model_dir, str(emb_dir), "--output", str(out), "--no_progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'p0.jpg' has 24 values but the model expects 16" in err[0]
    assert out.read_text() == ""  # no error line per embedding


@pytest.mark.parametrize("flags, expected", [
    ([], 128),  # greedy: 128 sequences in the LM at once (bench/bench_limits.py's peak)
    (["--num_beams", "5"], 25),  # 125 sequences: beam 5 peaked at 16-32 images
    (["--num_beams", "4", "--num_return_sequences", "2"], 32),
    (["--do_sample", "--num_return_sequences", "3"], 42),
    (["--batch_size", "7", "--num_beams", "5"], 7),  # given: kept as it is
])
def test_default_batch_size_is_measured_rows_per_batch(flags, expected):
    from prefixcap.caption import cli as caption_cli

    parser = caption_cli.build_parser()
    job = caption_cli.job_from_args(parser, parser.parse_args(["--model", "m", "x", *flags]))
    assert job.pipeline.batch_size == expected
