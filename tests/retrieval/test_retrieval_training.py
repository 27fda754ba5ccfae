"""Retrieval in a training run's bookkeeping: a resume with another datastore or k is refused in one line (the same
datastore by another path, or a copy of it, resumes), and validation CIDEr leaves the validation images' own
captions out of their prompts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers_data import make_dataset
from test_retrieval_model import K, setup  # noqa: F401 - the module fixture: a dataset and its datastores

from prefixcap.cli import main


def _train(setup, out, *extra: str) -> list[str]:  # noqa: F811
    return ["train", "--data_dir", str(setup["data"]), "--output_dir", str(out), "--batch_size", "8",
            "--num_workers", "0", "--warmup_steps", "0", "--gpu_devices", "cpu", "--save_every_epochs", "0",
            "--save_every_steps", "1", "--prefix_length", str(K), *extra]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_resume_with_another_datastore_or_k_is_refused(setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    store = tmp_path / "ds"
    shutil.copytree(setup["ds"], store)
    out = tmp_path / "run"
    assert main(_train(setup, out, "--datastore", str(store), "--retrieval_k", "2", "--max_steps", "1")) == 0
    prompts = out / "retrieval" / "train" / "info.json"
    fingerprint = json.loads(prompts.read_text())["fingerprint"]
    resume = ("--resume", "latest", "--max_steps", "2")
    capsys.readouterr()

    cases = [(("--datastore", str(setup["ds_other"]), "--retrieval_k", "2"), [str(setup["ds_other"]), str(store)]),
             (("--datastore", str(store), "--retrieval_k", "3"), ["--retrieval_k 3", "--retrieval_k 2"]),
             ((), ["--datastore", str(store), "not without retrieval"])]
    for flags, needles in cases:
        assert main(_train(setup, out, *flags, *resume)) == 2
        line = _one_error_line(capsys)
        assert all(n in line for n in needles) and "--output_dir" in line, line
    # Refused before any prompt was computed: the run's stored prompts are still its datastore's.
    assert json.loads(prompts.read_text())["fingerprint"] == fingerprint

    # The same folder rebuilt (its manifest changed) is another datastore, though at the same path.
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "created_at": "later"}))
    assert main(_train(setup, out, "--datastore", str(store), "--retrieval_k", "2", *resume)) == 2
    assert "manifest differs" in _one_error_line(capsys)
    (store / "manifest.json").write_text(json.dumps(manifest))

    # The same datastore by a relative path, or a copy of it elsewhere, resumes.
    monkeypatch.chdir(tmp_path)
    assert main(_train(setup, out, "--datastore", "ds", "--retrieval_k", "2", *resume)) == 0
    shutil.copytree(store, tmp_path / "elsewhere")
    assert main(_train(setup, out, "--datastore", "elsewhere", "--retrieval_k", "2", "--resume", "latest",
                       "--max_steps", "3")) == 0
    state = json.loads((out / "demo_model_latest.ckpt" / "training_state" / "trainer.json").read_text())
    assert state["state"]["global_step"] == 3


def test_a_run_without_retrieval_refuses_a_datastore_on_resume(setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "plain"
    assert main(_train(setup, out, "--max_steps", "1", "--only_prefix")) == 0
    capsys.readouterr()
    assert main(_train(setup, out, "--only_prefix", "--datastore", str(setup["ds"]), "--resume", "latest",
                       "--max_steps", "2")) == 2
    line = _one_error_line(capsys)
    assert "without retrieval" in line and str(setup["ds"]) in line


def test_validation_cider_leaves_the_validation_images_own_captions_out(tmp_path, tiny_gpt2, tiny_clip, monkeypatch,
                                                                         capsys):
    """A datastore holding every image's caption; the prompts validation CIDEr captions with are those of a
    search that leaves the image's own caption out (by value), and never contain it."""
    from prefixcap import load_preprocessed
    from prefixcap.retrieval.datastore import Datastore, Retriever
    from prefixcap.retrieval.prompt import format_prompt

    texts = [f"a {c} {s}" for c, s in [("red", "circle"), ("blue", "square"), ("green", "star"), ("pink", "cross"),
                                        ("grey", "ring"), ("black", "moon")]]
    data = make_dataset(tmp_path / "data", tiny_gpt2, num_images=6, captions_per_image=1, num_shards=1,
                        captions=texts, prefix_length=K, manifest_overrides={"clip_model": tiny_clip})
    with (tmp_path / "caps.jsonl").open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"image_path": f"img{i:05d}.jpg", "key": f"img{i:05d}", "caption": text}) + "\n")
    assert main(["datastore", "build", "--clip_model", tiny_clip, "--no_progress", "--input_dataset",
                 str(tmp_path / "caps.jsonl"), "--input_format", "jsonl", "--key_column", "key",
                 "--output_dir", str(tmp_path / "ds")]) == 0
    seen: list[tuple[np.ndarray, list[str]]] = []  # (queries, prompts) of the captioner's retrievals
    original = Retriever.prompts

    def spy(self, embeddings, exclude_keys=None):
        out = original(self, embeddings, exclude_keys)
        if exclude_keys is None:  # the Captioner's call (training's own prompts come with their keys)
            seen.append((np.asarray(embeddings, np.float32).copy(), [self.tokenizer.decode(p) for p in out]))
        return out

    monkeypatch.setattr(Retriever, "prompts", spy)
    capsys.readouterr()
    assert main(["train", "--data_dir", str(data), "--output_dir", str(tmp_path / "run"), "--datastore",
                 str(tmp_path / "ds"), "--retrieval_k", "5", "--batch_size", "4", "--num_workers", "0",
                 "--gpu_devices", "cpu", "--save_every_epochs", "0", "--prefix_length", str(K),
                 "--val_fraction", "0.34", "--eval_every_steps", "1", "--eval_cider_images", "2",
                 "--max_steps", "1"]) == 0
    assert "CIDEr during training unavailable" not in capsys.readouterr().out
    assert seen, "validation CIDEr did not caption with retrieval"

    store, images = Datastore(tmp_path / "ds"), load_preprocessed(data)
    known = [images.image(i) for i in range(images.num_images)]  # (key, embedding) of every image
    own_in_plain_top_k = 0
    for queries, prompts in seen:
        for q, prompt in zip(queries, prompts):
            key, _ = min(known, key=lambda ke: float(np.abs(ke[1] - q).max()))  # the validation image queried
            own = texts[int(key[3:])]
            assert own not in prompt, (key, prompt)
            expected = store.search(q[None], 5, exclude_keys=[key])[0]
            assert prompt == format_prompt([store.caption(j) for j in expected])
            own_in_plain_top_k += own in [store.caption(j) for j in store.search(q[None], 5)[0]]
    assert own_in_plain_top_k, "the test needs a validation image whose own caption a plain search returns"


def test_a_query_of_no_known_image_is_an_error(setup):  # noqa: F811
    from prefixcap.caption.captioner import Captioner
    from prefixcap.retrieval.training import OwnCaptionsLeftOut

    cap = Captioner.from_pretrained(setup["model"])
    known = np.eye(2, 16, dtype=np.float32)
    retriever = OwnCaptionsLeftOut(cap.retriever, ["img00000", "img00001"], known)
    assert retriever.own_keys(known[::-1] * 3) == [["img00001"], ["img00000"]]
    with pytest.raises(ValueError, match="matches none of the 2 known images"):
        retriever.captions(np.ones((1, 16), np.float32))
