"""The preprocess stage end to end: the seed command, every input format, bad input, resume after kill -9, 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prefixcap import load_preprocessed
from prefixcap.data.shards import SHARD_DIR
from prefixcap.preprocess.cli import main
from prep_helpers import (awkward_images, fork_main, image_bytes, kill_after_files, reference_embeddings,
                          run_args, simple_webdataset, write_tar)

REPO = Path(__file__).resolve().parents[2]
SIZE = (64, 48)


def dump(path):
    """Everything a sample holds, for exact comparisons between runs."""
    ds = load_preprocessed(path)
    return [(s.key, s.caption, s.tokens.tolist(), s.embedding.tobytes(), s.image_index) for s in ds]


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # a single-process run, whatever launched pytest
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, tiny_clip, tiny_gpt2):
    """The seed README's command line, verbatim but for the model names, run as `python create_dataset.py`."""
    work = tmp_path_factory.mktemp("seed")
    simple_webdataset(work / "webdataset", num_tars=3, per_tar=4, size=SIZE)
    cmd = [sys.executable, str(REPO / "create_dataset.py"),
           "--input_dataset", "./webdataset/{000..002}.tar",
           "--output_folder", "./preprocessed_dataset/",
           "--input_format", "webdataset",
           "--batch_size", "1024", "--num_prepro_workers", "16",
           "--wds_image_key", "jpg", "--wds_caption_key", "txt",
           "--clip_model", tiny_clip,
           "--tokenizer_model_type", "gpt2",
           "--tokenizer_model_variant", tiny_gpt2,
           "--max_token_length", "128", "--prefix_length", "10", "--device", "cuda:0"]
    proc = subprocess.run(cmd, cwd=work, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc


def test_seed_command_on_webdataset(seed_run, tiny_gpt2):
    work, proc = seed_run
    if not torch.cuda.is_available():
        assert "CUDA is not available; using cpu" in proc.stderr
    assert "12 images" in proc.stdout
    ds = load_preprocessed(work / "preprocessed_dataset")
    m = ds.manifest.to_dict()  # as manifest.json holds it
    assert m["num_images"] == 12 and m["num_captions"] == 12 and m["num_skipped"] == 0 and m["skipped"] == {}
    assert m["embedding_dim"] == 16 and m["normalized"] is False and m["lm_family"] == "causal"
    assert m["tokenizer"] == tiny_gpt2
    assert m["max_token_length"] == 128 and m["prefix_length"] == 10 and m["num_truncated"] == 0
    assert sum(s["num_images"] for s in m["shards"]) == 12 and m["format_version"] >= 1 and m["created_by"]
    assert [s.key for s in ds] == [f"{t:03d}{i:04d}" for t in range(3) for i in range(4)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert ds[5].caption == "a photo of a red circle number 101"
    assert ds[5].tokens.tolist() == tok(ds[5].caption)["input_ids"] + [tok.eos_token_id]
    assert ds.embedding_dim == 16 and ds._shards[0].embeddings.dtype == np.float16


def test_stored_embeddings_match_the_encoder(seed_run, tiny_clip):
    work, _ = seed_run
    ds = load_preprocessed(work / "preprocessed_dataset")
    images = {f"{t:03d}{i:04d}": image_bytes(t * 100 + i, size=SIZE) for t in range(3) for i in range(4)}
    expected = reference_embeddings(tiny_clip, images)
    for sample in ds:
        np.testing.assert_allclose(sample.embedding, expected[sample.key], rtol=2e-3, atol=2e-3)
    # and not trivially: different images really have different embeddings
    assert not np.allclose(ds[0].embedding, ds[1].embedding, atol=1e-2)


def _write_sources(root: Path, n: int = 4) -> dict[str, bytes]:
    """The same n images (5 captions each) laid out for files / csv / jsonl / parquet / coco."""
    images = {f"img{i}": image_bytes(50 + i, size=SIZE) for i in range(n)}
    (root / "images").mkdir(parents=True)
    rows, karpathy = [], []
    for i, (key, data) in enumerate(images.items()):
        (root / "images" / f"{key}.jpg").write_bytes(data)
        (root / "images" / f"{key}.txt").write_text(f"caption of {key}")
        rows += [(f"images/{key}.jpg", f"caption {j} of {key}", key) for j in range(5)]
        karpathy.append({"filepath": "images", "filename": f"{key}.jpg", "cocoid": key, "split": "train",
                         "sentences": [{"raw": f"caption {j} of {key}"} for j in range(5)]})
    (root / "t.csv").write_text("image_path,caption\n" + "".join(f"{p},{c}\n" for p, c, _ in rows))
    (root / "t.jsonl").write_text("".join(json.dumps({"image_path": p, "caption": c}) + "\n" for p, c, _ in rows))
    pq.write_table(pa.table({"image_path": [r[0] for r in rows], "caption": [r[1] for r in rows]}), root / "t.parquet")
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy}))
    return images


@pytest.mark.parametrize("fmt", ["files", "csv", "jsonl", "parquet", "coco"])
def test_each_input_format(tmp_path, tiny_clip, tiny_t5, fmt):
    images = _write_sources(tmp_path / "src")
    inputs = {"files": tmp_path / "src" / "images", "csv": tmp_path / "src" / "t.csv",
              "jsonl": tmp_path / "src" / "t.jsonl", "parquet": tmp_path / "src" / "t.parquet",
              "coco": tmp_path / "src" / "dataset_coco.json"}[fmt]
    workers = "2" if fmt in {"files", "coco"} else "0"
    rc = main(run_args(inputs, tmp_path / "out", tiny_clip, tiny_t5, "--num_prepro_workers", workers,
                       "--batch_size", "3", "--samples_per_shard", "3", fmt=fmt, model_type="t5"))
    assert rc == 0
    ds = load_preprocessed(tmp_path / "out")
    per_image = 1 if fmt == "files" else 5
    assert ds.manifest.num_images == ds.num_images == 4  # five captions, one encoding per image
    assert len(ds) == 4 * per_image and ds.manifest.lm_family == "seq2seq"
    keys = [ds.image(i)[0] for i in range(ds.num_images)]
    key_of = {k: k.split("/")[-1] for k in keys}
    assert sorted(key_of.values()) == sorted(images)
    expected = reference_embeddings(tiny_clip, images)
    for i, key in enumerate(keys):
        np.testing.assert_allclose(ds.image(i)[1], expected[key_of[key]], rtol=2e-3, atol=2e-3)
    refs = ds.references()
    assert all(len(r) == per_image for r in refs.values())
    assert all(s.tokens[-1] == 1 for s in ds)  # T5's </s>


def test_embeddings_input_is_not_reencoded(tmp_path, tiny_gpt2):
    (tmp_path / "emb" / "img_emb").mkdir(parents=True)
    (tmp_path / "emb" / "metadata").mkdir()
    rng = np.random.default_rng(0)
    for part in range(2):
        emb = rng.normal(size=(3, 8)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        np.save(tmp_path / "emb" / "img_emb" / f"img_emb_{part}.npy", emb.astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"p{part}/{i}.jpg" for i in range(3)],
                                 "caption": ["", "b", "c"] if part == 0 else ["d", "e", "f"]}),
                       tmp_path / "emb" / "metadata" / f"metadata_{part}.parquet")
    # A CLIP name that does not exist locally is fine: nothing is encoded.
    rc = main(run_args(tmp_path / "emb", tmp_path / "out", "ViT-B/32", tiny_gpt2, "--num_prepro_workers", "0",
                       fmt="embeddings"))
    assert rc == 0
    ds = load_preprocessed(tmp_path / "out")
    m = ds.manifest.to_dict()  # as manifest.json holds it
    assert m["num_images"] == 5 and m["skipped"] == {"no_caption": 1} and m["embedding_dim"] == 8
    assert m["normalized"] is True and m["clip_model"] == "ViT-B/32"
    stored = np.load(tmp_path / "emb" / "img_emb" / "img_emb_1.npy")
    np.testing.assert_array_equal(ds[2].embedding, stored[0].astype(np.float32))
    assert ds[2].key == "p1/0.jpg" and ds[2].caption == "d"


def test_bad_inputs_are_counted_and_never_stop_the_run(tmp_path, tiny_clip, tiny_gpt2, capsys):
    cases = awkward_images()
    samples = [(name, {"jpg": data, "txt": f"an image called {name}".encode()}) for name, (data, _, _) in cases.items()]
    samples += [
        ("no_caption", {"jpg": image_bytes(20)}),
        ("empty_caption", {"jpg": image_bytes(21), "txt": b"   "}),
        ("latin1_caption", {"jpg": image_bytes(22), "txt": b"caf\xe9 au lait"}),
        ("no_image", {"txt": b"a caption without its image"}),
        ("long_caption", {"jpg": image_bytes(23), "txt": b"a very long caption " * 20}),
    ]
    write_tar(tmp_path / "wds" / "000.tar", samples)
    full = write_tar(tmp_path / "wds" / "001.tar", [(f"t{i}", {"jpg": image_bytes(30 + i, size=(64, 64)), "txt": b"x"})
                                                    for i in range(6)])
    data = full.read_bytes()
    full.write_bytes(data[: len(data) * 2 // 3])
    rc = main(run_args(str(tmp_path / "wds" / "{000..001}.tar"), tmp_path / "out", tiny_clip, tiny_gpt2,
                       "--num_prepro_workers", "2", "--batch_size", "4", "--max_image_pixels", "1000000",
                       "--max_token_length", "16"))
    assert rc == 0
    ds = load_preprocessed(tmp_path / "out")
    m = ds.manifest.to_dict()  # as manifest.json holds it
    expected_skips = {"empty_file": 1, "not_an_image": 1, "truncated": 1, "too_large": 1, "no_caption": 2,
                      "missing_image": 1, "truncated_tar": 1}
    assert m["skipped"] == expected_skips and m["num_skipped"] == sum(expected_skips.values())
    # the animated GIF is a palette image too: both conversions are counted
    assert m["converted"] == {"cmyk": 1, "palette": 2, "grayscale": 2, "alpha": 1, "animated": 1,
                              "non_utf8_caption": 1}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    long = next(s for s in ds if s.key == "long_caption")  # stored cut to the text its 16 tokens say
    assert long.caption.startswith("a very long") and len(long.caption) < len("a very long caption " * 20) - 1
    assert tok.decode(long.tokens, skip_special_tokens=True).strip() == long.caption and m["num_truncated"] == 1
    assert max(len(s.tokens) for s in ds) == 16 and all(s.tokens[-1] == tok.eos_token_id for s in ds)
    keys = [s.key for s in ds]
    good_from_cut_tar = [k for k in keys if k.startswith("t")]
    assert 1 <= len(good_from_cut_tar) < 6
    assert set(keys) - set(good_from_cut_tar) == {"good", "cmyk", "palette", "grayscale", "gray16", "alpha", "animated",
                                                  "latin1_caption", "long_caption"}
    assert next(s for s in ds if s.key == "latin1_caption").caption == "caf\ufffd au lait"
    stats = json.loads((tmp_path / "out" / SHARD_DIR / "u000000-p0000.json").read_text())
    assert ["zero_byte", "empty_file"] in stats["skipped_keys"] and ["no_image", "missing_image"] in stats["skipped_keys"]
    assert "skipped 'zero_byte': empty_file" in capsys.readouterr().err


def test_wrong_arguments_fail_at_once(tmp_path, tiny_clip, tiny_gpt2, capsys):
    wds = simple_webdataset(tmp_path / "wds", num_tars=1, per_tar=2, size=SIZE)
    out = tmp_path / "out"
    assert main(run_args(tmp_path / "nowhere.tar", out, tiny_clip, tiny_gpt2)) == 2
    assert "nowhere.tar' does not exist" in capsys.readouterr().err
    assert main(run_args(wds[0], out, "RN50", tiny_gpt2)) == 2
    assert "no Hugging Face port" in capsys.readouterr().err
    assert main(run_args(wds[0], out, str(tmp_path / "no_such_model"), tiny_gpt2)) == 2
    assert "cannot load CLIP model" in capsys.readouterr().err
    assert main(run_args(wds[0], out, tiny_clip, str(tmp_path / "no_lm"))) == 2
    assert "cannot load a tokenizer" in capsys.readouterr().err
    (tmp_path / "t.csv").write_text("path,text\na.jpg,x\n")
    assert main(run_args(tmp_path / "t.csv", out, tiny_clip, tiny_gpt2, fmt="csv")) == 2
    assert "has no column 'image_path'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(run_args(wds[0], out, tiny_clip, tiny_gpt2, fmt="zip"))
    assert exc.value.code == 2 and "invalid choice: 'zip'" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing was started

    assert main(run_args(wds[0], out, tiny_clip, tiny_gpt2, "--num_prepro_workers", "0")) == 0
    assert main(run_args(wds[0], out, tiny_clip, tiny_gpt2, "--num_prepro_workers", "0")) == 0  # finished: a no-op
    assert main(run_args(wds[0], out, tiny_clip, tiny_gpt2, "--max_token_length", "32")) == 2
    assert "max_token_length: folder has 128, this run asks for 32" in capsys.readouterr().err


# ------------------------------------------------------------------ resume and scale-out

RESUME_EXTRA = ["--batch_size", "2", "--samples_per_shard", "2", "--num_prepro_workers", "1"]


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory, tiny_clip, tiny_gpt2):
    """8 tars x 3 images and an uninterrupted reference run over them."""
    work = tmp_path_factory.mktemp("resume")
    simple_webdataset(work / "wds", num_tars=8, per_tar=3, size=SIZE)
    pattern = str(work / "wds" / "{000..007}.tar")
    assert main(run_args(pattern, work / "reference", tiny_clip, tiny_gpt2, *RESUME_EXTRA)) == 0
    return work, pattern


def test_resume_after_kill_9_matches_uninterrupted_run(resume_data, tiny_clip, tiny_gpt2):
    work, pattern = resume_data
    out = work / "killed"
    child = fork_main(main, run_args(pattern, out, tiny_clip, tiny_gpt2, *RESUME_EXTRA))
    kill_after_files(child, out / SHARD_DIR, "*.json", 2, poll=0.02)
    assert not (out / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (out / SHARD_DIR).glob("*.json")}
    assert 2 <= len(before) < 16

    assert main(run_args(pattern, out, tiny_clip, tiny_gpt2, *RESUME_EXTRA)) == 0  # the same command
    after = {p.name: p.stat().st_mtime_ns for p in (out / SHARD_DIR).glob("*.json")}
    assert all(after[name] == mtime for name, mtime in before.items())  # finished shards were not redone
    assert dump(out) == dump(work / "reference")
    assert load_preprocessed(out).manifest.num_images == 24


def test_two_ranks_write_one_dataset(resume_data, tiny_clip, tiny_gpt2):
    work, pattern = resume_data
    out = work / "two_ranks"
    args = run_args(pattern, out, tiny_clip, tiny_gpt2, *RESUME_EXTRA)
    procs = [fork_main(main, args, WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r)) for r in range(2)]
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = {json.loads(p.read_text())["rank"] for p in (out / SHARD_DIR).glob("*.json")}
    assert ranks == {0, 1}  # both ranks wrote shards
    assert dump(out) == dump(work / "reference")  # one manifest covering everything, in input order
    assert load_preprocessed(out).manifest.world_size == 2


def test_resume_finishes_a_unit_killed_between_its_parts(resume_data, tiny_clip, tiny_gpt2):
    """The state a kill -9 leaves between two parts of a unit, made deterministic (issue 24): every unit
    complete but one, whose first part is complete and whose last is not. The same command, rerun as a
    process, must finish that unit: a "unit finished" rule that takes any complete part for the whole
    unit would lose its last image."""
    import shutil

    from prefixcap.preprocess.progress import PROGRESS_DIR, shard_name

    work, pattern = resume_data
    out = work / "between_parts"
    shutil.copytree(work / "reference", out)
    (out / "manifest.json").unlink()
    for marker in (out / PROGRESS_DIR).glob("*.done.json"):
        marker.unlink()
    last_part = shard_name(3, 1)  # 3 images per tar, 2 per part: unit 3 is parts 0 (2 images) and 1 (1 image)
    assert (out / SHARD_DIR / f"{shard_name(3, 0)}.json").exists()
    removed = [p for p in (out / SHARD_DIR).iterdir() if p.name.startswith(last_part)]
    assert removed
    for path in removed:
        path.unlink()
    proc = subprocess.run([sys.executable, "-m", "prefixcap.cli", "preprocess",
                           *run_args(pattern, out, tiny_clip, tiny_gpt2, *RESUME_EXTRA)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (out / SHARD_DIR / f"{last_part}.json").exists()
    assert dump(out) == dump(work / "reference")
