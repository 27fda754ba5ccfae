"""`prefixcap evaluate`: predictions/references formats, reports, bad input, CLIPScore sources, --model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prefixcap.caption.captioner as caption_module  # a broken import must fail the module, never skip it
import prefixcap.evaluate.scoring as E
import prefixcap.evaluate.references as R
import prefixcap.evaluate.cli as EC
import prefixcap.evaluate.metrics as M

needs_java = pytest.mark.skipif(not M.java_available(), reason="java is not on PATH")

CAPTIONS = {
    1: ["a man riding a brown horse on a beach", "a person rides a horse near the sea"],
    2: ["two small dogs playing with a red frisbee", "dogs chase a frisbee in the park"],
    3: ["a plate of rice and broccoli", "food on a white plate"],
    4: ["a red double decker bus on a street", "a bus driving down the road"],
}


@pytest.fixture
def coco(tmp_path) -> dict[str, Path]:
    """COCO-format references (captions_*.json) with images, plus predictions in both formats."""
    images = tmp_path / "images"
    images.mkdir()
    colours = {1: "red", 2: "green", 3: "blue", 4: "yellow"}
    for i, colour in colours.items():
        Image.new("RGB", (24 + 4 * i, 24), colour).save(images / f"COCO_val2014_{i:012d}.jpg")
    refs = {
        "info": {}, "licenses": [], "type": "captions",
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in CAPTIONS],
        "annotations": [{"id": 10 * i + j, "image_id": i, "caption": c}
                        for i, caps in CAPTIONS.items() for j, c in enumerate(caps)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(refs))
    results = [
        {"image_id": 1, "caption": "A man riding a brown horse on a beach."},  # a reference, verbatim
        {"image_id": 2, "caption": "zebra giraffe elephant"},  # shares no word with its references
        {"image_id": 3, "caption": "a plate of rice"},
        {"image_id": 4, "caption": "a red bus on a street"},
    ]
    (tmp_path / "results.json").write_text(json.dumps(results))
    with open(tmp_path / "preds.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps({"key": str(r["image_id"]), "caption": r["caption"], "score": -0.5}) + "\n")
    return {"root": tmp_path, "refs": tmp_path / "captions.json", "results": tmp_path / "results.json",
            "jsonl": tmp_path / "preds.jsonl", "images": images}


def read_outputs(folder: Path) -> tuple[dict, str, list[dict]]:
    summary = json.loads((folder / "metrics.json").read_text())
    table = (folder / "metrics.md").read_text()
    per = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return summary, table, per


@needs_java
def test_coco_results_end_to_end(coco, tiny_clip, capsys):
    out = coco["root"] / "out"
    rc = EC.main(["--predictions", str(coco["results"]), "--references", str(coco["refs"]), "--images",
                 str(coco["images"]), "--clip_model", tiny_clip, "--output_dir", str(out), "--name", "tiny"])
    assert rc == 0
    summary, table, per = read_outputs(out)
    m = summary["metrics"]
    for col in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "CLIPScore", "RefCLIPScore"):
        assert isinstance(m[col], float), col
    assert "SPICE" in m  # a number when CoreNLP is installed, null (skipped with a notice) otherwise
    if m["SPICE"] is None:
        assert sum(n.startswith("SPICE skipped") for n in summary["notices"]) == 1
    assert 0 <= m["CLIPScore"] <= 2.5
    assert summary["counts"]["scored"] == 4 and summary["counts"]["clipscore_images"] == 4
    s = summary["settings"]
    assert s["clip"]["model"] == tiny_clip and s["clip"]["image_source"] == "images"
    assert s["tokenizer"] == "ptb" and s["reference_format"] == "coco"
    by_key = {p["key"]: p for p in per}
    # A verbatim reference scores the maximum, a caption sharing no word scores zero.
    assert by_key["1"]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert by_key["1"]["METEOR"] == pytest.approx(1.0, abs=1e-6)
    for col in ("Bleu_1", "METEOR", "ROUGE_L", "CIDEr"):
        assert by_key["2"][col] == pytest.approx(0.0, abs=1e-6), col
    assert by_key["3"]["references"] == CAPTIONS[3]
    assert "| model | B@4 | METEOR | CIDEr | SPICE |" in table
    assert f"| tiny | {100 * m['Bleu_4']:.2f} | {100 * m['METEOR']:.2f} | {100 * m['CIDEr']:.2f} |" in table
    assert "| tiny |" in capsys.readouterr().out


def test_jsonl_predictions_limit_and_library_call(coco):
    out = coco["root"] / "out"
    rc = EC.main(["--predictions", str(coco["jsonl"]), "--references", str(coco["refs"]), "--limit", "2",
                 "--metrics", "bleu,cider", "--tokenizer", "simple", "--output_dir", str(out)])
    assert rc == 0
    summary, _, per = read_outputs(out)
    assert summary["counts"]["scored"] == 2 and [p["key"] for p in per] == ["1", "2"]
    assert summary["settings"]["limit"] == 2
    assert set(summary["metrics"]) >= {"Bleu_4", "CIDEr", "mean_length_words", "distinct_caption_share"}
    assert "METEOR" not in summary["metrics"]
    # No --images: CLIPScore is not asked for here, so no CLIPScore notice either.
    assert not any("CLIPScore" in n for n in summary["notices"])
    # The same figures through the library function training calls.
    refs = R.load_references(coco["refs"])
    preds = R.load_predictions(coco["jsonl"]).captions
    lib = E.evaluate_predictions({k: preds[k] for k in ("1", "2")}, refs.captions, metrics=["bleu", "cider"],
                                 tokenizer="simple", progress=False)
    assert lib["metrics"]["CIDEr"] == pytest.approx(summary["metrics"]["CIDEr"])


def test_same_caption_everywhere_is_visible(coco):
    res = E.evaluate_predictions({str(i): "A dog." for i in CAPTIONS}, {str(i): c for i, c in CAPTIONS.items()},
                                 metrics=["cider"], tokenizer="simple", progress=False)
    assert res["metrics"]["distinct_captions"] == 1
    assert res["metrics"]["distinct_caption_share"] == pytest.approx(0.25)
    assert res["metrics"]["vocabulary_size"] == 2


def test_bad_input_is_counted_and_reported(coco, capsys):
    refs = json.loads(coco["refs"].read_text())
    refs["images"].append({"id": 5, "file_name": "no_captions.jpg"})  # an image without any reference
    coco["refs"].write_text(json.dumps(refs))
    lines = [
        {"key": "1", "caption": "a man on a horse"},
        {"key": "2", "caption": "   "},  # empty prediction
        {"key": "3", "caption": "", "error": "cannot read image"},  # the caption stage failed
        {"key": "5", "caption": "a cat"},  # image with no reference
        {"key": "999", "caption": "a cat"},  # image not in the references
        {"key": "1", "caption": "a duplicate"},
    ]
    preds = coco["root"] / "bad.jsonl"
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = coco["root"] / "out"
    rc = EC.main(["--predictions", str(preds), "--references", str(coco["refs"]), "--metrics", "bleu,cider",
                 "--tokenizer", "simple", "--output_dir", str(out)])
    assert rc == 0
    summary, _, per = read_outputs(out)
    c = summary["counts"]
    assert (c["predictions"], c["scored"], c["unknown_images"], c["no_reference"], c["empty_predictions"],
            c["caption_errors"], c["duplicate_predictions"]) == (5, 3, 1, 1, 1, 1, 1)
    assert c["reference_images_without_prediction"] == 1  # image 4
    assert summary["problems"]["unknown_images"] == ["999"]
    assert summary["problems"]["no_reference"] == ["5"]
    notices = "\n".join(summary["notices"])
    assert "'999'" in notices and "'5'" in notices and "duplicate" in notices
    by_key = {p["key"]: p for p in per}
    assert by_key["999"]["skipped"] == "unknown image" and by_key["5"]["skipped"] == "no reference"
    assert by_key["2"]["CIDEr"] == 0.0 and by_key["3"]["error"] == "cannot read image"

    capsys.readouterr()
    for drop, named in ((0, "'1'"), (1, "'999'")):  # duplicates are checked first, then unknown images
        preds.write_text("".join(json.dumps(x) + "\n" for x in lines[: len(lines) - drop]))
        rc = EC.main(["--predictions", str(preds), "--references", str(coco["refs"]), "--metrics", "bleu",
                     "--tokenizer", "simple", "--strict", "--output_dir", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err
        assert "error:" in err and named in err and "--strict" in err


@pytest.mark.parametrize("content, expected", [
    ('{"key": "1", "caption": "a"}\n{not json\n', "line 2"),
    ('{"key": "1", "caption": 5}\n', "caption must be a string"),
    ('[{"caption": "no id"}]', "no image key"),
    ('"just a string"', "expected JSONL lines"),
    ('\udcff', "not UTF-8"),
])
def test_malformed_predictions_stop_with_a_message(coco, capsys, content, expected):
    bad = coco["root"] / ("bad.jsonl" if content.startswith("{") else "bad.json")
    bad.write_bytes(b"\xff\xfe" if content == "\udcff" else content.encode())
    rc = EC.main(["--predictions", str(bad), "--references", str(coco["refs"]), "--output_dir",
                 str(coco["root"] / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and str(bad) in err and "Traceback" not in err


def test_flag_and_file_errors(coco, capsys):
    cases = [
        (["--predictions", str(coco["results"])], "needs --references"),
        (["--references", str(coco["refs"])], "either --predictions"),
        (["--predictions", str(coco["root"] / "nope.json"), "--references", str(coco["refs"])], "not found"),
        (["--predictions", str(coco["results"]), "--references", str(coco["root"])], "not a preprocessed"),
        (["--predictions", str(coco["results"]), "--references", str(coco["refs"]), "--metrics", "bleu,wer"],
         "unknown metric"),
        (["--predictions", str(coco["results"]), "--references", str(coco["refs"]), "--images",
          str(coco["images"]), "--clip_model", str(coco["root"] / "no_clip_here")], "--no_clipscore"),
    ]
    for argv, expected in cases:
        rc = EC.main(argv + ["--output_dir", str(coco["root"] / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and "Traceback" not in err, (argv, err)


def test_karpathy_split_and_file_name_keys(tmp_path):
    data = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "cocoid": 1, "split": "test",
         "sentences": [{"raw": "A horse on a beach.", "tokens": ["a", "horse"]}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "cocoid": 2, "split": "val",
         "sentences": [{"raw": "Two dogs."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000003.jpg", "cocoid": 3, "split": "restval",
         "sentences": [{"raw": "A plate."}]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    refs = R.load_references(path, "test")
    assert refs.source == "karpathy" and refs.captions == {"1": ["A horse on a beach."]}
    assert refs.image_files["1"] == "val2014/COCO_val2014_000000000001.jpg"
    assert refs.resolve("COCO_val2014_000000000001") == "1"
    assert list(R.load_references(path, "train,restval").captions) == ["3"]
    with pytest.raises(R.EvaluationError, match="no image in split 'tset'.*restval, test, val"):
        R.load_references(path, "tset")
    # Predictions keyed by file name are matched to the COCO ids.
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"key": "COCO_val2014_000000000001.jpg", "caption": "a horse on a beach"}) + "\n")
    rc = EC.main(["--predictions", str(preds), "--references", str(path), "--metrics", "bleu", "--tokenizer",
                 "simple", "--output_dir", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert rc == 0 and summary["counts"]["scored"] == 1 and summary["settings"]["split"] == "test"
    # On Karpathy test the paper's rows are printed beside the run, in the paper's layout.
    table = (tmp_path / "out" / "metrics.md").read_text()
    assert "| ClipCap paper: MLP mapper, fine-tuned GPT-2 | 32.15 |" in table


def write_preprocessed(folder: Path, clip: str, embeddings: np.ndarray) -> Path:
    """A minimal preprocessed dataset (two shards) written with the shard format's own writer."""
    from prefixcap.data.shards import Manifest, ShardContent, ShardEntry, write_shard

    keys = [str(i) for i in CAPTIONS]
    shards = []
    for s, part in enumerate((keys[:2], keys[2:])):
        rows = [r for r, k in enumerate(part) for _ in CAPTIONS[int(k)]]
        caps = [c for k in part for c in CAPTIONS[int(k)]]
        idx = [keys.index(k) for k in part]
        write_shard(folder, f"{s:05d}", ShardContent(part, embeddings[idx], rows, caps, [[1, 2, 0]] * len(caps)),
                    {"images": len(part)})
        shards.append(ShardEntry(f"{s:05d}", len(part), len(caps)))
    Manifest(clip_model=clip, embedding_dim=embeddings.shape[1], shards=shards).write(folder)
    return folder


def test_preprocessed_references_use_stored_embeddings_for_clipscore(coco, tiny_clip, tmp_path):
    from prefixcap.model.encoders import load_encoder

    enc = load_encoder(tiny_clip)
    paths = [coco["images"] / f"COCO_val2014_{i:012d}.jpg" for i in CAPTIONS]
    feats, _ = M.encode_images(enc, [str(p) for p in paths])
    data = write_preprocessed(tmp_path / "pre", tiny_clip, feats.numpy())
    refs = R.load_references(data)
    assert refs.source == "preprocessed" and refs.captions["3"] == CAPTIONS[3]
    out = tmp_path / "out"
    rc = EC.main(["--predictions", str(coco["jsonl"]), "--references", str(data), "--metrics", "cider,clipscore",
                 "--tokenizer", "simple", "--clip_model", tiny_clip, "--output_dir", str(out)])
    assert rc == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["settings"]["clip"]["image_source"] == "embeddings"
    # Stored (float16) embeddings give the CLIPScore the images themselves give.
    direct = E.evaluate_predictions(R.load_predictions(coco["jsonl"]).captions, refs.captions,
                                    images={str(i): str(p) for i, p in zip(CAPTIONS, paths)}, clip_model=enc,
                                    metrics=["clipscore"], progress=False)
    assert summary["metrics"]["CLIPScore"] == pytest.approx(direct["metrics"]["CLIPScore"], abs=2e-3)
    assert summary["metrics"]["RefCLIPScore"] == pytest.approx(direct["metrics"]["RefCLIPScore"], abs=2e-3)


# --- --model mode -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tiny_clip, tiny_gpt2) -> Path:
    import torch

    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel

    torch.manual_seed(0)
    config = CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                           mapping=MappingConfig(prefix_size=16, prefix_length=2), only_prefix=True,
                           max_token_length=6)
    return CaptionModel(config).save_pretrained(tmp_path_factory.mktemp("eval_model") / "model")


def test_model_mode_on_images_and_on_embeddings(coco, tiny_artifact, tiny_clip, tmp_path):
    out = tmp_path / "out_images"
    rc = EC.main(["--model", str(tiny_artifact), "--dataset", str(coco["refs"]), "--images", str(coco["images"]),
                 "--limit", "3", "--metrics", "bleu,cider,clipscore", "--tokenizer", "simple", "--clip_model",
                 tiny_clip, "--max_new_tokens", "5", "--batch_size", "2", "--output_dir", str(out)])
    assert rc == 0
    summary, table, per = read_outputs(out)
    assert summary["counts"]["scored"] == 3 and summary["counts"]["clipscore_images"] == 3
    s = summary["settings"]
    assert s["model"] == str(tiny_artifact) and s["caption_input"] == "images"
    assert s["decoding"]["num_beams"] == 1 and s["decoding"]["max_new_tokens"] == 5
    # The same captions as calling the captioner directly.
    cap = caption_module.Captioner.from_pretrained(tiny_artifact)
    direct = cap.caption([str(coco["images"] / f"COCO_val2014_{i:012d}.jpg") for i in (1, 2, 3)],
                         max_new_tokens=5)
    assert [p["caption"] for p in per] == direct

    data = write_preprocessed(tmp_path / "pre", tiny_clip, np.random.default_rng(0).normal(size=(4, 16)))
    out = tmp_path / "out_emb"
    rc = EC.main(["--model", str(tiny_artifact), "--dataset", str(data), "--metrics", "bleu,clipscore",
                 "--tokenizer", "simple", "--clip_model", tiny_clip, "--max_new_tokens", "5",
                 "--output_dir", str(out)])
    assert rc == 0
    summary, _, per = read_outputs(out)
    assert summary["settings"]["caption_input"] == "embeddings" and summary["counts"]["scored"] == 4
    assert summary["settings"]["clip"]["image_source"] == "embeddings"
    emb = np.stack([R.load_references(data).embeddings[k] for k in ("1", "2", "3", "4")])
    assert [p["caption"] for p in per] == cap.caption_embeddings(emb, max_new_tokens=5)


def test_model_mode_counts_missing_images(coco, tiny_artifact, tmp_path):
    (coco["images"] / "COCO_val2014_000000000002.jpg").unlink()
    (coco["images"] / "COCO_val2014_000000000003.jpg").write_bytes(b"broken")
    out = tmp_path / "out"
    rc = EC.main(["--model", str(tiny_artifact), "--dataset", str(coco["refs"]), "--images", str(coco["images"]),
                 "--no_clipscore", "--metrics", "bleu", "--tokenizer", "simple", "--max_new_tokens", "4",
                 "--output_dir", str(out)])
    assert rc == 0
    summary, _, per = read_outputs(out)
    assert summary["counts"]["caption_errors"] == 2 and summary["counts"]["scored"] == 4
    assert sorted(summary["problems"]["caption_errors"]) == ["2", "3"]
    assert {p["key"]: p.get("error", "") for p in per}["2"].startswith("image not found")


def test_model_mode_on_webdataset_shards(tmp_path, tiny_artifact, tiny_clip):
    import io
    import tarfile

    def jpg(colour: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (30, 26), colour).save(buf, format="JPEG")
        return buf.getvalue()

    samples = [("a", jpg("red"), ["a red square", "a red image"]), ("b", jpg("blue"), ["a blue square"]),
               ("c", b"broken", ["a broken image"])]
    tar = tmp_path / "eval-000000.tar"
    with tarfile.open(tar, "w") as tf:
        for key, image, caps in samples:
            for name, data in ((f"{key}.jpg", image), (f"{key}.json", json.dumps({"txt": caps}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    rc = EC.main(["--model", str(tiny_artifact), "--dataset", str(tar), "--input_format", "webdataset",
                 "--wds_caption_in_metadata", "--metrics", "bleu,clipscore", "--tokenizer", "simple",
                 "--clip_model", tiny_clip, "--max_new_tokens", "4", "--output_dir", str(out)])
    assert rc == 0
    summary, _, per = read_outputs(out)
    by_key = {p["key"]: p for p in per}
    assert by_key["a"]["references"] == ["a red square", "a red image"]  # grouped by image
    assert summary["counts"]["scored"] == 3 and summary["counts"]["caption_errors"] == 1
    # The same per-image error text `prefixcap caption` writes (one pipeline for both).
    assert by_key["c"]["error"].startswith("not_an_image") and summary["problems"]["caption_errors"] == ["c"]
    assert summary["counts"]["empty_predictions"] == 0  # the failure is counted once, as an error
    assert summary["counts"]["clipscore_images"] == 2 and "CLIPScore" in by_key["a"]
    assert summary["settings"]["input_format"] == "webdataset"
    assert summary["settings"]["clip"]["image_source"] == "images read with --input_format webdataset"
