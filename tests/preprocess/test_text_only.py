"""preprocess --text_only: CLIP text embeddings of captions from every caption-only input, one row per caption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prefixcap import load_preprocessed
from prefixcap.data.shards import SHARD_DIR
from prefixcap.preprocess.cli import main
from prep_helpers import run_args, write_tar

CAPTIONS = ["a red circle on the left", "a small blue square", "there is a big green triangle at the top",
            "a yellow star in the middle", "one purple cross near the bottom"]


def reference_text_embeddings(clip: str, texts: list[str]) -> np.ndarray:
    """The tiny CLIP's own text features, straight from transformers (not through prefixcap.model.encoders)."""
    from transformers import AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(clip).eval(), AutoTokenizer.from_pretrained(clip)
    ids = tok(texts, padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings,
              return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**ids)
    return getattr(out, "pooler_output", out).numpy()  # (N, C)


def rows(path) -> list[tuple[str, str, np.ndarray]]:
    return [(s.key, s.caption, s.embedding.astype(np.float32)) for s in load_preprocessed(path)]


def write_inputs(folder):
    """The same five captions as jsonl (a list in one row), csv, parquet, a text file, a text-only tar and
    a Hugging Face dataset with a text column only; none names an image."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.jsonl").write_text(json.dumps({"caption": CAPTIONS[:2]}) + "\n"
                                    + "".join(json.dumps({"caption": c}) + "\n" for c in CAPTIONS[2:]))
    (folder / "c.csv").write_text("caption\n" + "".join(f"{c}\n" for c in CAPTIONS))
    pq.write_table(pa.table({"caption": CAPTIONS}), folder / "c.parquet")
    (folder / "c.txt").write_text("\n".join(CAPTIONS[:3]) + "\n\n" + "\n".join(CAPTIONS[3:]) + "\n")
    write_tar(folder / "wds" / "000.tar", [(f"{i:04d}", {"txt": c.encode()}) for i, c in enumerate(CAPTIONS)])
    datasets.Dataset.from_dict({"text": CAPTIONS}).save_to_disk(str(folder / "hf"))
    return {"jsonl": folder / "c.jsonl", "csv": folder / "c.csv", "parquet": folder / "c.parquet",
            "text": folder / "c.txt", "webdataset": folder / "wds" / "000.tar", "hf_dataset": folder / "hf"}


def test_every_caption_only_input_gives_one_text_embedding_per_caption(tmp_path, tiny_clip, tiny_gpt2, capsys):
    inputs = write_inputs(tmp_path / "in")
    expected = reference_text_embeddings(tiny_clip, CAPTIONS)
    for fmt, path in inputs.items():
        out = tmp_path / f"out_{fmt}"
        extra = ["--caption_column", "text"] if fmt == "hf_dataset" else []
        assert main(run_args(path, out, tiny_clip, tiny_gpt2, "--text_only", "--num_prepro_workers", "0", *extra,
                             fmt=fmt)) == 0, fmt
        assert "CLIP text embeddings, one per caption" in capsys.readouterr().out
        ds = load_preprocessed(out)
        m = ds.manifest
        assert (m.num_images, m.num_captions, m.num_skipped) == (5, 5, 0), fmt
        assert m.text_only["embeddings"] == "text" and m.text_only["context_length"] == 32
        assert m.clip_model == tiny_clip and m.patch_tokens is None
        got = rows(out)
        assert [c for _, c, _ in got] == CAPTIONS, fmt
        assert len({k for k, _, _ in got}) == 5
        np.testing.assert_allclose(np.stack([e for _, _, e in got]), expected, rtol=2e-3, atol=2e-3)
    assert [k for k, _, _ in rows(tmp_path / "out_jsonl")][:2] == ["c/0#0", "c/0#1"]  # sample key # caption index
    assert [k for k, _, _ in rows(tmp_path / "out_text")] == ["c/1#0", "c/2#0", "c/3#0", "c/5#0", "c/6#0"]


def test_long_captions_are_cut_to_the_clip_context_and_counted(tmp_path, tiny_clip, tiny_gpt2, capsys):
    long = " ".join(["a red circle and a blue square"] * 12)  # far over the tiny CLIP's 32-token context
    (tmp_path / "c.txt").write_text(f"{long}\n{CAPTIONS[0]}\n")
    out = tmp_path / "out"
    assert main(run_args(tmp_path / "c.txt", out, tiny_clip, tiny_gpt2, "--text_only", "--num_prepro_workers", "0",
                         fmt="text")) == 0
    assert "clip_text_truncated: 1" in capsys.readouterr().out
    m = load_preprocessed(out).manifest
    assert m.converted == {"clip_text_truncated": 1}
    got = rows(out)
    assert got[0][1] == long  # the LM still learns the whole caption (within --max_token_length)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_clip)
    ids = tok(long)["input_ids"]
    assert len(ids) > 32
    cut_text = tok.decode(ids[1:31])  # what fits: start + 30 tokens + end
    ref = reference_text_embeddings(tiny_clip, [cut_text, CAPTIONS[0]])
    np.testing.assert_allclose(np.stack([e for _, _, e in got]), ref, rtol=2e-3, atol=2e-3)


def test_image_only_options_and_formats_are_refused_in_one_line(tmp_path, tiny_clip, tiny_gpt2, capsys):
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    capsys.readouterr()  # the datasets library's save bar
    cases = [
        (run_args(inputs["jsonl"], out, tiny_clip, tiny_gpt2, "--text_only", "--store_patch_tokens", fmt="jsonl"),
         "--store_patch_tokens / --patch_pool need images"),
        (run_args(inputs["text"], out, tiny_clip, tiny_gpt2, fmt="text"), "--input_format text holds captions only"),
        (run_args(tmp_path, out, tiny_clip, tiny_gpt2, "--text_only", fmt="embeddings"),
         "holds precomputed image embeddings"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
    # a finished text-only folder resumed with another CLIP: the settings check names the differing keys
    no_workers = ("--text_only", "--num_prepro_workers", "0")
    assert main(run_args(inputs["jsonl"], out, tiny_clip, tiny_gpt2, *no_workers, fmt="jsonl")) == 0
    capsys.readouterr()
    from prefixcap.demo.tiny_models import build_tiny_clip

    other = str(build_tiny_clip(tmp_path / "other_clip", projection_dim=8, seed=1))
    assert main(run_args(inputs["jsonl"], out, other, tiny_gpt2, *no_workers, fmt="jsonl")) == 2
    err = capsys.readouterr().err
    assert "clip_model" in err and len(err.strip().splitlines()) == 1


def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path, tiny_clip, tiny_gpt2):
    lines = [f"a {c} shape number {i}" for i in range(3000) for c in ("red",)]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    extra = ["--text_only", "--batch_size", "10", "--samples_per_shard", "20", "--num_prepro_workers", "0"]
    reference = tmp_path / "reference"
    assert main(run_args(tmp_path / "c.txt", reference, tiny_clip, tiny_gpt2, *extra, fmt="text")) == 0
    out = tmp_path / "killed"
    # A fresh interpreter (not a fork of this one, which holds the datasets/tqdm state of the tests above).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    child = subprocess.Popen([sys.executable, "-m", "prefixcap.cli", "preprocess",
                              *run_args(tmp_path / "c.txt", out, tiny_clip, tiny_gpt2, *extra, fmt="text")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and child.poll() is None:
        if len(list((out / SHARD_DIR).glob("*.json"))) >= 2:
            break
        time.sleep(0.005)
    assert child.poll() is None, "the child finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (out / SHARD_DIR).glob("*.json")}
    assert 2 <= len(before) < 150
    assert main(run_args(tmp_path / "c.txt", out, tiny_clip, tiny_gpt2, *extra, fmt="text")) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / SHARD_DIR).glob("*.json")}
    assert all(after[name] == mtime for name, mtime in before.items())  # finished shards were not redone
    got, ref = rows(out), rows(reference)
    assert [(k, c) for k, c, _ in got] == [(k, c) for k, c, _ in ref] and len(got) == 3000
    assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(got, ref))
