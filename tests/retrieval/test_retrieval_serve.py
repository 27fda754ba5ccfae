"""serve with a retrieval model: the retrieved captions of each image on request (the very ones its prompt was
built from, checked against a brute-force search), requests with and without them in one batch, the page's
checkbox, and the refusal for a model trained without retrieval."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_retrieval_model import setup  # noqa: F401 - the module fixture: a tiny model trained with a datastore

from prefixcap.retrieval.datastore import Retriever
from prefixcap.retrieval.prompt import format_prompt
from prefixcap.serve.app import create_app
from prefixcap.serve.batching import BatchConfig
from prefixcap.serve.config import ServeConfig


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (30 + 4 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


class _SpyRetriever(Retriever):
    """The model's Retriever, counting its searches and keeping the prompts it returns (what the LM reads)."""

    def __init__(self, inner: Retriever):
        super().__init__(inner.datastore, inner.settings, inner.tokenizer)
        self.searches = 0
        self.prompt_texts: list[str] = []

    def retrieve(self, embeddings, exclude_keys=None):
        self.searches += 1
        return super().retrieve(embeddings, exclude_keys)

    def prompts(self, embeddings, exclude_keys=None):
        out = super().prompts(embeddings, exclude_keys)
        self.prompt_texts += [self.tokenizer.decode(p) for p in out]
        return out


@pytest.fixture(scope="module")
def served(setup):  # noqa: F811
    from prefixcap.caption.captioner import Captioner

    cap = Captioner.from_pretrained(setup["model"])
    cap.retriever = _SpyRetriever(cap.retriever)
    # Two requests share a batch: it is sent when full (2 images), long before max_wait_ms.
    config = ServeConfig(model=str(setup["model"]), warmup=False,
                         batch=BatchConfig(max_batch_size=2, max_wait_ms=5000))
    with TestClient(create_app(cap, config), base_url="http://localhost") as client:
        yield cap, client


def _brute_force(setup, cap, image: Image.Image) -> list[tuple[str, float]]:
    """The k nearest captions of the image's embedding by numpy over the datastore's stored vectors (no FAISS)."""
    from prefixcap.retrieval.datastore import Datastore

    store = Datastore(setup["ds"])
    vectors = np.fromfile(setup["ds"] / "embeddings.f32", np.float32).reshape(len(store), -1)  # (N, C)
    q = cap.encode_pixels(cap.load_pixels([image]))[0].float().numpy()  # (C,)
    scores = vectors @ (q / np.linalg.norm(q))
    best = np.argsort(-scores, kind="stable")[:cap.retriever.settings.k]
    return [(store.caption(int(i)), float(scores[i])) for i in best]


def test_retrieved_captions_are_the_prompts_and_the_nearest(served, setup):
    cap, client = served
    images = _images(2)
    searches = cap.retriever.searches
    cap.retriever.prompt_texts.clear()
    files = [("images", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images)]
    r = client.post("/v1/captions", files=files, data={"retrieved": "true", "max_new_tokens": "5"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert cap.retriever.searches == searches + 1  # one search for the batch: nothing retrieved twice
    for i, (image, result) in enumerate(zip(images, results)):
        got = [(x["caption"], x["score"]) for x in result["retrieved"]]
        expected = _brute_force(setup, cap, image)
        assert [c for c, _ in got] == [c for c, _ in expected]  # the k nearest, none left out
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-4)
        assert [c for c, _ in got] == cap.retriever.captions(cap.encode_pixels(cap.load_pixels([image])).numpy())[0]
        # ... and exactly the captions of the prompt the LM read for this image.
        assert cap.retriever.prompt_texts[i] == format_prompt([c for c, _ in got])
        assert result["caption"] == cap.caption([image], max_new_tokens=5)[0]


def test_requests_with_and_without_retrieved_captions_share_a_batch(served, setup):
    cap, client = served
    images = _images(4)[2:]
    calls = client.get("/healthz").json()["batcher"]["model_calls"]
    answers: dict[str, dict] = {}

    def post(name: str, image: Image.Image, fields: dict) -> None:
        payload = {"images": [base64.b64encode(_png(image)).decode()], "max_new_tokens": 5, **fields}
        answers[name] = client.post("/v1/captions", json=payload).json()

    threads = [threading.Thread(target=post, args=("with", images[0], {"retrieved": True})),
               threading.Thread(target=post, args=("without", images[1], {}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stats = client.get("/healthz").json()["batcher"]
    assert stats["model_calls"] == calls + 1 and stats["largest_batch"] == 2  # one batch for both requests
    with_, without = answers["with"]["results"][0], answers["without"]["results"][0]
    assert [x["caption"] for x in with_["retrieved"]] == [c for c, _ in _brute_force(setup, cap, images[0])]
    assert "retrieved" not in without and without["caption"] == cap.caption([images[1]], max_new_tokens=5)[0]
    assert with_["caption"] == cap.caption([images[0]], max_new_tokens=5)[0]


def test_page_has_the_checkbox_and_the_api_documents_the_field(served):
    _, client = served
    page = client.get("/").text
    assert 'id="show-retrieved"' in page and "show retrieved captions" in page
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "retrieved" in schema["CaptionJSONRequest"]["properties"]
    assert "retrieved" in schema["ImageResult"]["properties"]


@pytest.mark.parametrize("value, needle", [("maybe", "retrieved: expected true or false"), ("", "retrieved")])
def test_a_bad_retrieved_value_is_422_naming_it(served, value, needle):
    _, client = served
    r = client.post("/v1/captions", files=[("images", ("a.png", _png(_images(1)[0]), "image/png"))],
                    data={"retrieved": value})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_option"
    assert needle in r.json()["error"]["message"]
    r = client.post("/v1/captions", json={"images": [base64.b64encode(_png(_images(1)[0])).decode()],
                                          "retrieved": "yes"})
    assert r.status_code == 422 and "retrieved" in r.json()["error"]["message"]


def test_a_model_without_retrieval_refuses_with_422(tiny_clip, tiny_gpt2):
    from prefixcap.caption.captioner import Captioner
    from prefixcap.model import CaptionConfig, CaptionModel
    from prefixcap.model.mapping import MappingConfig

    model = CaptionModel(CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                                       mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32, prefix_length=4)))
    cap = Captioner(model)
    assert cap.retriever is None
    png = _png(_images(1)[0])
    with TestClient(create_app(cap, ServeConfig(warmup=False)), base_url="http://localhost") as client:
        assert client.get("/v1/model").json()["retrieval"] is None
        for r in (client.post("/v1/captions", files=[("images", ("a.png", png, "image/png"))],
                              data={"retrieved": "true"}),
                  client.post("/v1/captions", json={"images": [base64.b64encode(png).decode()], "retrieved": True})):
            error = r.json()["error"]
            assert r.status_code == 422 and error["code"] == "no_retrieval", r.text
            assert "trained without retrieval" in error["message"] and "\n" not in error["message"]
        r = client.post("/v1/captions", files=[("images", ("a.png", png, "image/png"))],
                        data={"retrieved": "false", "max_new_tokens": "3"})
        assert r.status_code == 200 and "retrieved" not in r.json()["results"][0]
        assert client.get("/healthz").json()["batcher"]["model_calls"] == 1  # the refused ones never queued
