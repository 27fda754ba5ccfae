"""The offline demo, scaled down (`prefixcap demo --quick`): the whole pipeline runs and really learns."""

import json

import pytest

from prefixcap.demo.cli import build_parser, config_from_args, main
from prefixcap.demo.run import QUICK, DemoConfig, _clip_stamp, _train_tiny_clip
from prefixcap.demo.synthetic import SyntheticConfig, write_dataset

# --quick, a little shorter still (70-78 s on 2 cores): fewer CLIP steps and epochs, no METEOR (it
# costs ~10 s per evaluate). One torch thread: with a second torch process on the same 2 cores
# (another test run, a build), two threads each run many times slower (measured: a 100 s test took
# over 12 min), while one thread is only ~10 % slower on a free machine.
ARGS = ["--quick", "--clip_max_steps", "400", "--epochs", "10", "--threads", "1",  # 1 is the default too
        "--eval_metrics", "bleu,rouge,cider,clipscore"]


@pytest.mark.slow
def test_quick_demo_learns_attributes(tmp_path):
    work = tmp_path / "demo"
    assert main(ARGS + ["--workdir", str(work)]) == 0

    report = json.loads((work / "report.json").read_text())
    accuracy, result = report["result"]["accuracy"], report["result"]
    # Learning is real: every attribute far above chance (<= 1/3), and most captions entirely right
    # (chance 1/90). Measured here: colour 1.00, shape 0.77, position 0.97, all three 0.75.
    for name in ("colour", "shape", "position"):
        assert accuracy[name] >= 0.6, (name, accuracy)
    assert accuracy["all"] >= 0.5, accuracy
    # The model beats a caption that ignores the image by a wide margin (same evaluate code).
    assert result["metrics"]["CIDEr"] > 2 * result["baseline_metrics"]["CIDEr"], result
    assert report["config"]["num_train"] == QUICK["num_train"] and report["config"]["clip_max_steps"] == 400

    assert (work / "contact_sheet.png").stat().st_size > 5_000
    assert "held-out captions" in (work / "report.md").read_text()
    assert set(result["stage_seconds"]) >= {"4. preprocess", "5. train (mapper + fine-tuned LM)"}
    assert {p.name for p in work.iterdir()} >= {"data", "clip", "lm", "preprocessed", "models", "eval",
                                                  "eval_baseline", "predictions.jsonl", "report.md"}

    # A second run reuses the data and the encoder (the stages after them are always rebuilt).
    cfg = config_from_args(build_parser().parse_args(ARGS + ["--workdir", str(work)]))
    dataset = write_dataset(work / "data", SyntheticConfig(num_train=cfg.num_train, num_test=cfg.num_test,
                                                           seed=cfg.seed), progress=False)
    assert dataset.reused
    assert _train_tiny_clip(cfg, dataset, work / "clip") == "reused"
    stored = json.loads((work / "clip" / "demo_stamp.json").read_text())
    changed = DemoConfig(**{**cfg.__dict__, "clip_max_steps": cfg.clip_max_steps + 1})
    assert _clip_stamp(changed, dataset.config.to_json()) != stored
    # The time budget only matters to a time-bounded CLIP run.
    assert _clip_stamp(DemoConfig(**{**cfg.__dict__, "clip_seconds": 1.0}), dataset.config.to_json()) == stored


def test_quick_and_explicit_sizes():
    def parse(*argv: str) -> DemoConfig:
        return config_from_args(build_parser().parse_args(list(argv)))

    assert parse().num_train == DemoConfig().num_train
    assert parse("--quick").num_train == QUICK["num_train"] and parse("--quick").epochs == QUICK["epochs"]
    assert parse("--quick", "--num_train", "3000").num_train == 3000
    timed = parse("--clip_max_steps", "0", "--clip_seconds", "60")
    assert timed.clip_max_steps is None and timed.clip_seconds == 60
