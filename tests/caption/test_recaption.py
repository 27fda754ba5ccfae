"""`prefixcap caption --output_dir`: one output shard per input shard, atomic, resumable after kill -9, split over ranks."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prefixcap.caption.captioner import Captioner
from prefixcap.caption.cli import main
from prefixcap.model.mapping import MappingConfig
from prefixcap.model import CaptionConfig, CaptionModel
from prefixcap.caption.pipeline import Item, PipelineOptions, caption_items
from prep_helpers import fork_main, image_bytes, kill_after_files, write_tar

C = 16
SIZE = (48, 40)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # one process, whatever launched pytest
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_clip, tiny_gpt2) -> str:
    torch.manual_seed(0)
    config = CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                           mapping=MappingConfig(prefix_size=C, prefix_length=4), max_token_length=8)
    path = tmp_path_factory.mktemp("recap") / "model"
    CaptionModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def cap(model_dir) -> Captioner:
    return Captioner.from_pretrained(model_dir)


def good(seed: int) -> dict[str, bytes]:
    return {"jpg": image_bytes(seed, size=SIZE), "txt": f"original caption {seed}".encode(),
            "json": json.dumps({"url": f"http://x/{seed}.jpg"}).encode()}


@pytest.fixture(scope="module")
def mixed_tars(tmp_path_factory) -> list[Path]:
    """Two img2dataset-like tars: the first with a non-image and an image-less sample among good ones."""
    folder = tmp_path_factory.mktemp("wds")
    first = [("s000_0000", good(0)), ("s000_0001", {"jpg": b"not an image", "txt": b"x"}),
             ("s000_0002", good(2)), ("s000_0003", {"txt": b"no image here"}), ("s000_0004", good(4))]
    second = [(f"s001_{i:04d}", good(100 + i)) for i in range(3)]
    return [write_tar(folder / "00000.tar", first), write_tar(folder / "00001.tar", second)]


def caption_args(model_dir, inputs, out, *extra) -> list[str]:
    return ["--model", model_dir, *map(str, inputs), "--output_dir", str(out), "--no_progress", *extra]


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_webdataset_in_webdataset_out(tmp_path, model_dir, cap, mixed_tars):
    out = tmp_path / "out"
    assert main(caption_args(model_dir, mixed_tars, out, "--output_format", "webdataset", "--copy_members",
                             "--batch_size", "3")) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "caption_settings.json",
        "caption_summary.json"]
    members = tar_members(out / "00000.tar")
    names = [n for n, _ in members]
    # Each sample's own members first (same order, same bytes), then the caption and its json.
    assert names == ["s000_0000.jpg", "s000_0000.txt", "s000_0000.json", "s000_0000.prefixcap.txt",
                     "s000_0000.prefixcap.json",
                     "s000_0001.jpg", "s000_0001.txt", "s000_0001.prefixcap.json",
                     "s000_0002.jpg", "s000_0002.txt", "s000_0002.json", "s000_0002.prefixcap.txt",
                     "s000_0002.prefixcap.json",
                     "s000_0003.txt", "s000_0003.prefixcap.json",
                     "s000_0004.jpg", "s000_0004.txt", "s000_0004.json", "s000_0004.prefixcap.txt",
                     "s000_0004.prefixcap.json"]
    data = dict(members)
    assert data["s000_0002.jpg"] == image_bytes(2, size=SIZE) and data["s000_0002.txt"] == b"original caption 2"
    expected = cap.caption([image_bytes(s, size=SIZE) for s in (0, 2, 4)])
    assert [data[f"s000_{i:04d}.prefixcap.txt"].decode() for i in (0, 2, 4)] == expected
    meta = json.loads(data["s000_0000.prefixcap.json"])
    assert meta["caption"] == expected[0] and meta["key"] == "s000_0000" and meta["score"] < 0
    assert meta["generation"]["num_beams"] == 1 and meta["model"] == model_dir
    assert json.loads(data["s000_0001.prefixcap.json"])["error"].startswith("not_an_image:")
    assert json.loads(data["s000_0003.prefixcap.json"])["error"].startswith("missing_image:")
    stats = json.loads((out / "00000_stats.json").read_text())
    assert (stats["items"], stats["captioned"], stats["num_errors"]) == (5, 3, 2)
    assert stats["errors"] == {"missing_image": 1, "not_an_image": 1}
    assert [k for k, _ in stats["error_keys"]] == ["s000_0001", "s000_0003"]
    assert stats["input"] == str(mixed_tars[0]) and stats["output"] == "00000.tar"
    summary = json.loads((out / "caption_summary.json").read_text())
    assert (summary["items"], summary["captioned"], summary["num_shards"]) == (8, 6, 2)
    assert summary["errors"] == {"missing_image": 1, "not_an_image": 1}
    assert summary["output_format"] == "webdataset" and summary["generation"]["num_beams"] == 1

    # The output shard reads back as webdataset, with the same keys in the same order.
    from prefixcap.data.readers import make_reader
    from prefixcap.data.records import ReaderConfig, ReaderOptions

    reader = make_reader(ReaderConfig([str(out / "00001.tar")], "webdataset",
                                      ReaderOptions(wds_caption_key="prefixcap.txt")))
    records = list(reader.records(0))
    assert [r.key for r in records] == [f"s001_{i:04d}" for i in range(3)]
    assert [r.captions[0].decode() for r in records] == cap.caption([image_bytes(100 + i, size=SIZE)
                                                                     for i in range(3)])


def test_webdataset_out_without_copy_and_a_custom_member(tmp_path, model_dir, mixed_tars):
    out = tmp_path / "out"
    assert main(caption_args(model_dir, mixed_tars[1:], out, "--output_format", "webdataset",
                             "--caption_member", "recap.txt", "--num_beams", "2", "--num_return_sequences",
                             "2")) == 0
    members = tar_members(out / "00001.tar")
    assert [n for n, _ in members] == [f"s001_{i:04d}.{m}" for i in range(3) for m in ("recap.txt", "recap.json")]
    meta = json.loads(dict(members)["s001_0000.recap.json"])
    assert len(meta["captions"]) == 2 and meta["caption"] == meta["captions"][0] == \
        dict(members)["s001_0000.recap.txt"].decode()
    assert meta["scores"][0] >= meta["scores"][1] and meta["generation"]["num_beams"] == 2


def test_parquet_and_jsonl_outputs(tmp_path, model_dir, cap, mixed_tars):
    expected = cap.caption([image_bytes(s, size=SIZE) for s in (0, 2, 4)])
    assert main(caption_args(model_dir, mixed_tars, tmp_path / "pq", "--output_format", "parquet")) == 0
    table = pq.read_table(tmp_path / "pq" / "00000.parquet").to_pydict()
    assert table["key"] == [f"s000_{i:04d}" for i in range(5)]
    assert [table["caption"][i] for i in (0, 2, 4)] == expected
    assert table["caption"][1] is None and table["error"][1].startswith("not_an_image:")
    assert table["error"][3].startswith("missing_image:") and table["error"][0] is None
    assert all(s < 0 for s in (table["score"][i] for i in (0, 2, 4))) and table["score"][1] is None
    assert set(table["shard"]) == {str(mixed_tars[0])}

    assert main(caption_args(model_dir, mixed_tars, tmp_path / "jl", "--output_format", "jsonl")) == 0
    rows = read_jsonl(tmp_path / "jl" / "00000.jsonl")
    assert [r["key"] for r in rows] == table["key"]
    assert [rows[i]["caption"] for i in (0, 2, 4)] == expected
    assert [rows[i]["score"] for i in (0, 2, 4)] == [round(table["score"][i], 5) for i in (0, 2, 4)]
    assert "error" in rows[1] and "error" in rows[3]
    assert len(read_jsonl(tmp_path / "jl" / "00001.jsonl")) == 3


def test_embeddings_input_into_parquet_never_decodes(tmp_path, model_dir, cap, monkeypatch):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, C)).astype(np.float32)
    folder = tmp_path / "emb"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for i, rows in enumerate((slice(0, 3), slice(3, 5))):
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", emb[rows])
        keys = [f"k{j}" for j in range(5)][rows]
        pq.write_table(pa.table({"key": keys}), folder / "metadata" / f"metadata_{i}.parquet")

    def no_decoding(self, image):
        raise AssertionError("an embeddings input must not be decoded")

    monkeypatch.setattr(Captioner, "preprocess", no_decoding)
    out = tmp_path / "out"
    assert main(caption_args(model_dir, [folder], out, "--output_format", "parquet")) == 0
    tables = [pq.read_table(out / f"img_emb_{i}.parquet").to_pydict() for i in range(2)]
    assert [t["key"] for t in tables] == [["k0", "k1", "k2"], ["k3", "k4"]]
    assert tables[0]["caption"] + tables[1]["caption"] == cap.caption_embeddings(emb)


# ------------------------------------------------------------------ resume and ranks
SLOW = ["--output_format", "jsonl", "--batch_size", "1", "--num_workers", "1"]
NUM_TARS = 16


def shard_contents(folder: Path) -> dict[str, list[dict]]:
    return {p.stem: read_jsonl(p) for p in sorted(folder.glob("*.jsonl"))}


@pytest.fixture(scope="module")
def many_tars(tmp_path_factory, model_dir):
    """16 tars x 3 images and an uninterrupted single-process run over them."""
    work = tmp_path_factory.mktemp("many")
    tars = [write_tar(work / "wds" / f"{t:05d}.tar", [(f"t{t:02d}_{i}", good(t * 10 + i)) for i in range(3)])
            for t in range(NUM_TARS)]
    assert main(caption_args(model_dir, [work / "wds"], work / "reference", *SLOW)) == 0
    return work, tars


def test_resume_after_kill_9_equals_an_uninterrupted_run(many_tars, model_dir):
    work, _ = many_tars
    out = work / "killed"
    child = fork_main(main, caption_args(model_dir, [work / "wds"], out, *SLOW))
    kill_after_files(child, out, "*_stats.json", 2)
    assert not (out / "caption_summary.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    assert 2 <= len(before) < NUM_TARS

    assert main(caption_args(model_dir, [work / "wds"], out, *SLOW)) == 0  # the same command
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    assert all(after[name] == mtime for name, mtime in before.items())  # finished shards were not redone
    assert shard_contents(out) == shard_contents(work / "reference")  # same keys, captions, scores; once each
    assert not list(out.glob(".*.tmp"))
    summary = json.loads((out / "caption_summary.json").read_text())
    assert (summary["items"], summary["captioned"], summary["num_shards"]) == (3 * NUM_TARS, 3 * NUM_TARS, NUM_TARS)


def test_half_written_shards_are_redone_and_finished_ones_kept(many_tars, model_dir, tmp_path):
    work, _ = many_tars
    out = tmp_path / "out"
    out.mkdir()
    for p in (work / "reference").iterdir():
        if p.name != "caption_summary.json" and not p.name.startswith("."):
            (out / p.name).write_bytes(p.read_bytes())
    # 00003: its data was renamed into place but the kill came before its stats (then garbled, to see it redone);
    # 00004: only a temporary file; 00005: finished, with a stray temporary file beside it.
    (out / "00003_stats.json").unlink()
    (out / "00003.jsonl").write_text('{"key": "garbage"}\n')
    (out / "00004_stats.json").unlink()
    (out / "00004.jsonl").unlink()
    (out / ".00004.jsonl.999999.tmp").write_text('{"key": "half a shard"}\n')
    (out / ".00005.jsonl.999998.tmp").write_text('{"key": "stray"}\n')
    kept = (out / "00005_stats.json").stat().st_mtime_ns
    assert main(caption_args(model_dir, [work / "wds"], out, *SLOW)) == 0
    assert shard_contents(out) == shard_contents(work / "reference")
    assert (out / "00005_stats.json").stat().st_mtime_ns == kept
    assert not (out / ".00004.jsonl.999999.tmp").exists()
    assert json.loads((out / "caption_summary.json").read_text())["num_shards"] == NUM_TARS


def test_two_ranks_split_the_shards(many_tars, model_dir):
    work, _ = many_tars
    out = work / "two_ranks"
    args = caption_args(model_dir, [work / "wds"], out, *SLOW)
    procs = [fork_main(main, args, WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r)) for r in range(2)]
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = {p.name[:5]: json.loads(p.read_text())["rank"] for p in out.glob("*_stats.json")}
    assert ranks == {f"{t:05d}": t % 2 for t in range(NUM_TARS)}  # disjoint: input shard u went to rank u % 2
    assert shard_contents(out) == shard_contents(work / "reference")  # together: one rank's output
    summary = json.loads((out / "caption_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["items"] == 3 * NUM_TARS


# ------------------------------------------------------------------ settings and flags
def test_other_settings_are_refused_unless_overwrite(tmp_path, model_dir, mixed_tars, capsys):
    out = tmp_path / "out"
    assert main(caption_args(model_dir, mixed_tars[1:], out)) == 0
    assert main(caption_args(model_dir, mixed_tars[1:], out)) == 0  # finished: a no-op
    assert "already finished" in capsys.readouterr().err
    assert main(caption_args(model_dir, mixed_tars[1:], out, "--num_beams", "2")) == 2
    err = capsys.readouterr().err
    assert "num_beams: folder has 1, this run asks for 2" in err and "--overwrite" in err
    assert main(caption_args(model_dir, mixed_tars[1:], out, "--output_format", "parquet")) == 2
    assert "output_format: folder has 'jsonl', this run asks for 'parquet'" in capsys.readouterr().err
    assert main(caption_args(model_dir, mixed_tars[1:], out, "--num_beams", "2", "--overwrite")) == 0
    assert json.loads((out / "caption_settings.json").read_text())["generation"]["num_beams"] == 2
    assert json.loads((out / "caption_summary.json").read_text())["generation"]["num_beams"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--copy_members"], "--copy_members needs --output_format webdataset"),
    (["--limit", "3"], "--limit does not apply with --output_dir"),
    (["--output", "x.jsonl"], "either --output"),
    (["--output_format", "webdataset", "--caption_member", "a/b.txt"], "--caption_member 'a/b.txt'"),
])
def test_flag_errors(tmp_path, model_dir, mixed_tars, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(caption_args(model_dir, mixed_tars, tmp_path / "o", *extra))
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_model_that_does_not_load_is_a_runtime_error(tmp_path, mixed_tars, capsys):
    out = tmp_path / "o"
    assert main(caption_args(str(tmp_path / "no_model"), mixed_tars, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load --model" in err[0] and "no_model" in err[0]
    assert not (out / "caption_settings.json").exists()  # a run that failed to start leaves no settings


def test_shard_flags_need_output_dir(model_dir, mixed_tars, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", model_dir, str(mixed_tars[0]), "--output_format", "parquet"])
    assert exc.value.code == 2 and "only apply with --output_dir" in capsys.readouterr().err


def test_encode_ahead_gives_the_same_results(cap):
    items = [Item("a", image=image_bytes(1, size=SIZE)), Item("b", image=b"broken"),
             Item("c", embedding=np.ones(C, np.float32)), Item("d", image=image_bytes(2, size=SIZE))]
    plain = [(r.key, r.captions, r.error) for r in caption_items(cap, items, PipelineOptions(batch_size=2))]
    items = [Item(i.key, image=i.image, embedding=i.embedding) for i in items]
    ahead = [(r.key, r.captions, r.error)
             for r in caption_items(cap, items, PipelineOptions(batch_size=2, encode_ahead=True))]
    assert ahead == plain and plain[1][2] is not None and all(p[1] for p in plain if p[0] != "b")
