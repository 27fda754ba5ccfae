"""The offline demo, scaled down: the whole pipeline runs and really learns to caption."""

import json

import pytest

from prefixcap.demo import DemoConfig, _clip_stamp, _train_tiny_clip, run_demo
from prefixcap.synthetic import SyntheticConfig, write_dataset

CHANCE = {"colour": 1 / 6, "shape": 1 / 3, "position": 1 / 5, "all": 1 / 90}


@pytest.mark.slow
def test_small_demo_learns_attributes(tmp_path):
    cfg = DemoConfig(workdir=str(tmp_path / "demo"), num_train=2000, num_test=60, clip_max_steps=500,
                     epochs=12, batch_size=32, threads=2, sheet_images=12)
    result = run_demo(cfg)

    # Learning is real: every attribute far above chance, and most captions entirely right.
    for name, chance in CHANCE.items():
        assert result.accuracy[name] > chance + 0.3, (name, result.accuracy)
    assert result.accuracy["all"] >= 0.5, result.accuracy
    # The model beats a caption that ignores the image by a wide margin.
    assert result.metrics["CIDEr"] > 2 * result.baseline_metrics["CIDEr"], (result.metrics, result.baseline_metrics)

    work = tmp_path / "demo"
    report = json.loads((work / "report.json").read_text())
    assert report["result"]["accuracy"] == result.accuracy
    assert (work / "contact_sheet.png").stat().st_size > 5_000
    assert "held-out captions" in (work / "report.md").read_text()
    assert set(result.stage_seconds) >= {"4. preprocess", "5. train (mapper + fine-tuned LM)"}

    # A second run reuses the data and the encoder (the stages after them are always rebuilt).
    dataset = write_dataset(work / "data", SyntheticConfig(num_train=2000, num_test=60, seed=0), progress=False)
    assert dataset.reused
    assert _train_tiny_clip(cfg, dataset, work / "clip") == "reused"
    changed = DemoConfig(**{**cfg.__dict__, "clip_max_steps": 501})
    assert _clip_stamp(changed, dataset.config.to_json()) != json.loads((work / "clip" / "demo_stamp.json").read_text())
