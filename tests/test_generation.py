"""The one decoding-options type: its bounds, and the CLI flags, serve schema and batching key derived from it."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math

import pytest
import torch
from PIL import Image

from prefixcap.generation import (FIELD_NAMES, MAX_NEW_TOKENS, MAX_NUM_BEAMS, MAX_TEMPERATURE, MIN_TEMPERATURE,
                                  GenerationSettings, GenerationSettingsError, add_generation_args,
                                  settings_from_args)

BAD_VALUES = [
    # (field, value, what the message must say after "field=")
    ("temperature", 1e-300, "1e-300 is out of range: expected a number in [0.01, 100]"),
    ("temperature", 1e-40, "1e-40 is out of range"),
    ("temperature", 0.0, "0.0 is out of range"),
    ("temperature", -1.0, "-1.0 is out of range"),
    ("temperature", 101.0, "101.0 is out of range"),
    ("temperature", math.nan, "nan is not finite"),
    ("temperature", math.inf, "inf is not finite"),
    ("temperature", True, "True has the wrong type (bool)"),
    ("temperature", "0.5", "'0.5' has the wrong type (str)"),
    ("top_p", 0.0, "0.0 is out of range: expected a number in (0, 1]"),
    ("top_p", 1.5, "1.5 is out of range"),
    ("top_p", -math.inf, "-inf is not finite"),
    ("top_k", -1, "-1 is out of range: expected an integer in [0, 10000]"),
    ("top_k", 10_001, "10001 is out of range"),
    ("top_k", 5.0, "5.0 has the wrong type (float)"),
    ("repetition_penalty", 0.0, "0.0 is out of range: expected a number in [0.01, 10]"),
    ("repetition_penalty", 1e-300, "1e-300 is out of range"),
    ("repetition_penalty", math.nan, "nan is not finite"),
    ("length_penalty", math.inf, "inf is not finite"),
    ("length_penalty", -11.0, "-11.0 is out of range: expected a number in [-10, 10]"),
    ("num_beams", 0, "0 is out of range: expected an integer in [1, 64]"),
    ("num_beams", -2, "-2 is out of range"),
    ("num_beams", 65, "65 is out of range"),
    ("num_beams", True, "True has the wrong type (bool)"),
    ("num_beams", 2.0, "2.0 has the wrong type (float)"),
    ("num_beams", 10**5000, "<a 16610-bit integer> is out of range"),  # str() of it would raise
    ("num_beams", None, "None has the wrong type (NoneType)"),
    ("num_return_sequences", 0, "0 is out of range: expected an integer in [1, 64]"),
    ("num_return_sequences", 10**20, "<a 67-bit integer> is out of range"),
    ("max_new_tokens", 0, "0 is out of range: expected an integer in [1, 1024]"),
    ("max_new_tokens", MAX_NEW_TOKENS + 1, "1025 is out of range"),
    ("max_new_tokens", False, "False has the wrong type (bool)"),
    ("do_sample", 1, "1 is not a boolean (got int): expected true or false"),
    ("do_sample", "yes", "'yes' is not a boolean (got str)"),
]


@pytest.mark.parametrize("name,value,message", BAD_VALUES,
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(BAD_VALUES)])  # str(10**5000) raises
def test_validate_rejects_a_bad_value_naming_field_value_and_range(name, value, message):
    # Sampling on, so the sampling knobs are live; they are checked either way (next test).
    values = {"do_sample": True, name: value}
    with pytest.raises(GenerationSettingsError) as info:
        GenerationSettings(**values).validate()
    assert list(info.value.problems) == [name]
    assert str(info.value).startswith(f"{name}={message}")
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


def test_sampling_knobs_are_validated_without_sampling_too():
    with pytest.raises(GenerationSettingsError, match=r"temperature=1e-300 is out of range"):
        GenerationSettings(temperature=1e-300).validate()


def test_every_problem_is_reported_at_once():
    with pytest.raises(GenerationSettingsError) as info:
        GenerationSettings(num_beams=0, top_p=2.0, temperature=math.nan, max_new_tokens=0).validate()
    assert set(info.value.problems) == {"num_beams", "top_p", "temperature", "max_new_tokens"}
    assert str(info.value).count("; ") == 3


def test_bounds_themselves_are_accepted():
    edges = [
        GenerationSettings(do_sample=True, temperature=MIN_TEMPERATURE, top_p=1.0, top_k=0),
        GenerationSettings(do_sample=True, temperature=MAX_TEMPERATURE, top_p=1e-9, top_k=10_000),
        GenerationSettings(num_beams=MAX_NUM_BEAMS, num_return_sequences=MAX_NUM_BEAMS, length_penalty=-10.0),
        GenerationSettings(max_new_tokens=1, repetition_penalty=0.01),
        GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=10, temperature=2),  # int for float
        GenerationSettings(max_new_tokens=None),
    ]
    for settings in edges:
        assert settings.validate() is settings


def test_return_sequences_need_beams_unless_sampling():
    with pytest.raises(GenerationSettingsError, match=r"num_return_sequences=3 needs num_beams >= 3"):
        GenerationSettings(num_return_sequences=3, num_beams=2).validate()
    GenerationSettings(num_return_sequences=3, num_beams=3).validate()
    GenerationSettings(num_return_sequences=3, do_sample=True).validate()


def test_settings_are_frozen_and_hashable():
    settings = GenerationSettings(num_beams=3)
    with pytest.raises(AttributeError):
        settings.num_beams = 4  # type: ignore[misc]
    assert {settings: 1}[GenerationSettings(num_beams=3)] == 1


def test_normalized_resets_only_knobs_that_cannot_matter():
    greedy = [GenerationSettings(temperature=t, top_k=k, length_penalty=lp).normalized()
              for t, k, lp in [(0.5, 3, 2.0), (2.0, 50, 1.0), (1.0, 0, -3.0)]]
    assert greedy[0] == greedy[1] == greedy[2] == GenerationSettings()
    assert len({hash(g) for g in greedy}) == 1
    sampled = GenerationSettings(do_sample=True, temperature=0.5, top_k=3, top_p=0.9).normalized()
    assert (sampled.temperature, sampled.top_k, sampled.top_p) == (0.5, 3, 0.9)
    beams = GenerationSettings(num_beams=4, length_penalty=2.0, temperature=0.3).normalized()
    assert beams.length_penalty == 2.0 and beams.temperature == 1.0
    # What reaches generate: no ignored knob (generate warns about those), no max_new_tokens
    # (the captioner resolves it against the LM's context).
    assert GenerationSettings(temperature=0.5, max_new_tokens=7).generate_kwargs() == {
        "num_beams": 1, "do_sample": False, "repetition_penalty": 1.0, "num_return_sequences": 1}
    assert GenerationSettings(do_sample=True, num_beams=2, top_p=0.8).generate_kwargs() == {
        "num_beams": 2, "do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.8,
        "repetition_penalty": 1.0, "length_penalty": 1.0, "num_return_sequences": 1}


def test_split_kwargs_overrides_fields_and_passes_the_rest_on():
    base = GenerationSettings(num_beams=2, max_new_tokens=9)
    settings, extra = GenerationSettings.split_kwargs(base, {"num_beams": 4, "output_attentions": False})
    assert settings == GenerationSettings(num_beams=4, max_new_tokens=9) and extra == {"output_attentions": False}
    with pytest.raises(GenerationSettingsError, match="temperature=1e-40"):
        GenerationSettings.split_kwargs(None, {"do_sample": True, "temperature": 1e-40})


# --- the batching key ----------------------------------------------------------------------------
class RecordingCaptioner:
    def __init__(self):
        self.calls: list[tuple[int, GenerationSettings]] = []

    def caption(self, images, batch_size, settings):
        self.calls.append((len(images), settings))
        return [f"caption {i}" for i in range(len(images))]


def test_greedy_requests_with_different_temperatures_share_one_batch():
    from prefixcap.serve.batching import BatchConfig, DynamicBatcher

    captioner = RecordingCaptioner()

    async def scenario():
        batcher = DynamicBatcher(captioner, BatchConfig(max_batch_size=16, max_wait_ms=100))
        await batcher.start()
        try:
            jobs = [batcher.submit(["img"], GenerationSettings(temperature=t, max_new_tokens=5))
                    for t in (0.5, 1.0, 2.0, 7.5)]
            jobs.append(batcher.submit(["img"], GenerationSettings(do_sample=True, temperature=0.5,
                                                                   max_new_tokens=5)))
            return await asyncio.gather(*jobs)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    # The four greedy images were one batch (positions 0..3 in it); the sampled one was alone.
    assert sorted(r[0][0] for r in results[:4]) == [f"caption {i}" for i in range(4)]
    assert results[4] == [["caption 0"]]
    by_sampling = {s.do_sample: (n, s) for n, s in captioner.calls}
    assert len(captioner.calls) == 2  # the four greedy requests went to the model together
    assert by_sampling[False] == (4, GenerationSettings(max_new_tokens=5))
    assert by_sampling[True] == (1, GenerationSettings(do_sample=True, temperature=0.5, max_new_tokens=5))


# --- CLI flags -----------------------------------------------------------------------------------
def test_flags_are_derived_from_the_fields():
    parser = argparse.ArgumentParser()
    add_generation_args(parser)
    args = parser.parse_args([])
    assert settings_from_args(args) == GenerationSettings()
    args = parser.parse_args(["--num_beams", "3", "--do_sample", "--temperature", "0.7", "--top_k", "0",
                              "--top_p", "0.9", "--repetition_penalty", "1.2", "--length_penalty", "0.5",
                              "--max_new_tokens", "12", "--num_return_sequences", "2"])
    assert settings_from_args(args) == GenerationSettings(3, True, 0.7, 0, 0.9, 1.2, 0.5, 12, 2)
    parser = argparse.ArgumentParser()
    add_generation_args(parser, exclude=("num_return_sequences",))
    assert settings_from_args(parser.parse_args([])).num_return_sequences == 1
    assert {a.dest for a in parser._actions} == set(FIELD_NAMES) - {"num_return_sequences"} | {"help"}


def test_caption_help_shows_defaults_and_ranges(capsys):
    from prefixcap.caption.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for needle in ["--num_beams N 1 = greedy; > 1 = beam search; an integer in [1, 64] (default: 1)",
                   "--temperature X sampling only", "[0.01, 100] (default: 1.0)",
                   "an integer in [0, 10000] (default: 50)", "(0, 1] (default: 1.0)",
                   "(default: the longest caption the model was trained with)",
                   "--num_return_sequences N", "--do_sample sample instead of greedy / beam search"]:
        assert needle in text


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "1e-300"], "argument --temperature: expected a number in [0.01, 100], got '1e-300'"),
    (["--temperature", "nan"], "argument --temperature: expected a number in [0.01, 100], got 'nan'"),
    (["--num_beams", "-1"], "argument --num_beams: expected an integer in [1, 64], got '-1'"),
    (["--num_beams", "2.5"], "argument --num_beams: expected an integer in [1, 64], got '2.5'"),
    (["--num_beams", "9" * 5001], "argument --num_beams: expected an integer in [1, 64], got '999"),
    (["--top_p", "0"], "argument --top_p: expected a number in (0, 1], got '0'"),
    (["--num_return_sequences", "3"], "num_return_sequences=3 needs num_beams >= 3"),
])
def test_caption_bad_flag_value_exits_2_with_one_line(argv, message, capsys, tmp_path):
    from prefixcap.caption.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--model", str(tmp_path / "no_model"), str(tmp_path / "a.png"), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("prefixcap caption: error: ") and message in last
    assert len(last) < 300  # a 5,001-digit value is shortened


def test_evaluate_shares_the_flags_but_scores_one_caption(capsys):
    from prefixcap.evaluate.cli import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(["--model", "m", "--dataset", "d", "--num_beams", "4", "--length_penalty", "0.5"])
    assert config_from_args(args).generation == GenerationSettings(num_beams=4, length_penalty=0.5)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--num_return_sequences", "2"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--temperature", "1e-40"])
    assert info.value.code == 2
    assert "argument --temperature: expected a number in [0.01, 100], got '1e-40'" in capsys.readouterr().err


# --- the captioner validates what reaches generate ------------------------------------------------
def test_captioner_refuses_tiny_temperature_before_sampling(tiny_gpt2):
    from prefixcap.caption.captioner import Captioner
    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel

    torch.manual_seed(0)
    cap = Captioner(CaptionModel(CaptionConfig(language_model=tiny_gpt2, max_token_length=4,
                                               mapping=MappingConfig("mlp", prefix_size=16, prefix_length=2))))
    emb = torch.randn(2, 16)
    for temperature in (1e-300, 1e-40):
        with pytest.raises(GenerationSettingsError, match=f"temperature={temperature}"):
            cap.generate(emb, GenerationSettings(do_sample=True, temperature=temperature))
        with pytest.raises(GenerationSettingsError, match=f"temperature={temperature}"):
            cap.caption_embeddings(emb, do_sample=True, temperature=temperature)
    # The lowest allowed temperature samples without inf/nan.
    texts = cap.caption_embeddings(emb, do_sample=True, temperature=MIN_TEMPERATURE, top_k=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# --- the serve schema ------------------------------------------------------------------------------
def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def serve_client():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from prefixcap.serve.config import ServeConfig
    from prefixcap.serve.app import create_app

    captioner = RecordingCaptioner()
    with TestClient(create_app(captioner, ServeConfig(warmup=False)), base_url="http://localhost") as client:
        client.captioner = captioner
        yield client


JSON_BAD = [
    ('"num_beams": true', "num_beams"),
    ('"num_beams": "5"', "num_beams"),
    ('"num_beams": 5.0', "num_beams"),
    ('"num_beams": -1', "num_beams=-1"),
    ('"num_beams": 0', "num_beams=0"),
    ('"num_beams": ' + "9" * 17, "num_beams=99999999999999999 is out of range"),
    ('"num_beams": ' + "9" * 100, "has 100 digits"),  # refused by the JSON reader itself (400)
    ('"do_sample": true, "temperature": 1e-300', "temperature=1e-300"),
    ('"do_sample": true, "temperature": 1e-40', "temperature=1e-40"),
    ('"temperature": 1e-300', "temperature=1e-300"),  # greedy: still a bad value
    ('"do_sample": true, "temperature": NaN', "NaN is not valid JSON"),  # JSON reader: 400
    ('"do_sample": true, "temperature": Infinity', "Infinity is not valid JSON"),
    ('"top_p": -Infinity', "-Infinity is not valid JSON"),
    ('"do_sample": true, "temperature": 1e400', "1e400 is out of range"),
    ('"top_k": -1', "top_k=-1"),
    ('"repetition_penalty": 0', "repetition_penalty=0"),
    ('"length_penalty": 1e308', "length_penalty=1e+308"),
    ('"do_sample": "true"', "do_sample"),
    ('"do_sample": 1', "do_sample"),
    ('"max_new_tokens": 0', "max_new_tokens=0"),
    ('"num_return_sequences": 2', "num_return_sequences=2 needs num_beams >= 2"),
    ('"num_beam": 2', "unknown field 'num_beam'"),
]


@pytest.mark.parametrize("options,needle", JSON_BAD)
def test_serve_json_rejects_the_same_values_with_a_4xx_json_error(serve_client, options, needle):
    image = base64.b64encode(_png()).decode()
    body = '{"images": ["' + image + '"], ' + options + "}"
    r = serve_client.post("/v1/captions", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    error = r.json()["error"]
    assert error["code"] == ("bad_json" if r.status_code == 400 else "bad_option"), error
    assert needle in error["message"], error
    assert serve_client.captioner.calls == []


@pytest.mark.parametrize("fields,needle", [
    ({"num_beams": "true"}, "num_beams: expected an integer in [1, 64], got 'true'"),
    ({"num_beams": "9" * 5001}, "num_beams: expected an integer"),
    ({"num_beams": "-1"}, "num_beams=-1"),
    ({"do_sample": "true", "temperature": "1e-300"}, "temperature=1e-300"),
    ({"do_sample": "true", "temperature": "nan"}, "temperature=nan is not finite"),
    ({"top_p": "inf"}, "top_p=inf is not finite"),
    ({"do_sample": "maybe"}, "do_sample: expected true or false, got 'maybe'"),
])
def test_serve_form_fields_are_parsed_like_the_flags_and_validated_the_same(serve_client, fields, needle):
    r = serve_client.post("/v1/captions", files={"images": ("a.png", _png(), "image/png")}, data=fields)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"]
    assert serve_client.captioner.calls == []


def test_serve_caps_are_policy_on_top_naming_the_flag(serve_client):
    image = base64.b64encode(_png()).decode()
    # Within the general bounds but over this server's caps (5 beams, 100 tokens, temperature 5).
    for options, needle in [({"num_beams": 6}, "expected an integer in [1, 5] on this server (--max_num_beams)"),
                            ({"num_beams": 64}, "num_beams=64"),
                            ({"max_new_tokens": 101}, "(--max_new_tokens_limit)"),
                            ({"do_sample": True, "temperature": 6.0}, "(--max_temperature)"),
                            ({"num_beams": 5, "num_return_sequences": 6}, "(--max_return_sequences)")]:
        r = serve_client.post("/v1/captions", json={"images": [image], **options})
        assert r.status_code == 422 and needle in r.json()["error"]["message"], (options, r.text)
    assert serve_client.captioner.calls == []


def test_serve_schema_fields_are_the_dataclass_fields_and_answers_normalized(serve_client):
    from prefixcap.serve.schemas import CaptionOptions

    assert tuple(CaptionOptions.model_fields) == FIELD_NAMES
    assert all(not f.is_required() for f in CaptionOptions.model_fields.values())
    schema = serve_client.get("/openapi.json").json()["components"]["schemas"]["CaptionJSONRequest"]
    assert "[0.01, 100]" in schema["properties"]["temperature"]["description"]
    image = base64.b64encode(_png()).decode()
    for temperature in (0.3, 3.0):  # greedy: the temperature cannot matter
        r = serve_client.post("/v1/captions", json={"images": [image], "temperature": temperature,
                                                    "num_beams": 1, "max_new_tokens": 7})
        assert r.status_code == 200, r.text
        assert r.json()["options"] == json.loads(json.dumps(
            {**GenerationSettings(max_new_tokens=7).__dict__}))
    assert [s for _, s in serve_client.captioner.calls] == [GenerationSettings(max_new_tokens=7)] * 2


def test_serve_config_refuses_caps_outside_the_general_bounds():
    pytest.importorskip("fastapi")
    from prefixcap.serve.config import ServeConfig
    from prefixcap.serve.cli import main

    with pytest.raises(ValueError, match=r"--max_num_beams 100 must be an integer in \[1, 64\]"):
        ServeConfig(max_num_beams=100)
    with pytest.raises(ValueError, match="--max_temperature"):
        ServeConfig(max_temperature=1e-300)
    with pytest.raises(ValueError, match="--default_max_new_tokens"):
        ServeConfig(default_max_new_tokens=200, max_new_tokens_limit=100)
    assert main(["--model", "unused", "--max_new_tokens_limit", "5000"]) == 2


def test_evaluate_library_call_validates_its_settings(tmp_path):
    from prefixcap.evaluate import EvaluateConfig, evaluate
    from prefixcap.evaluate.references import EvaluationError

    base = dict(model=str(tmp_path / "model"), dataset=str(tmp_path / "refs.json"), output_dir=str(tmp_path))
    with pytest.raises(EvaluationError, match=r"decoding flags: temperature=1e-40 is out of range"):
        evaluate(EvaluateConfig(**base, generation=GenerationSettings(do_sample=True, temperature=1e-40)))
    with pytest.raises(EvaluationError, match="one caption per image"):
        evaluate(EvaluateConfig(**base, generation=GenerationSettings(num_beams=2, num_return_sequences=2)))
