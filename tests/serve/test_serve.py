"""The HTTP service: endpoints, every error case, limits, dynamic batching, and a load test on loopback."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

# fastapi and uvicorn are in the dev extra: a missing one is a broken install, not a reason to skip.
from fastapi.testclient import TestClient  # noqa: E402

from prefixcap.serve.batching import BatchConfig, DynamicBatcher, QueueFull  # noqa: E402
from prefixcap.generation import GenerationSettings  # noqa: E402
from prefixcap.serve.config import ServeConfig  # noqa: E402
from prefixcap.serve.http import background_server  # noqa: E402
from prefixcap.serve.app import create_app  # noqa: E402
from prefixcap.serve.cli import main  # noqa: E402


# --- helpers -----------------------------------------------------------------------------------
def png(size=(8, 8), color=(255, 0, 0), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


def fake_caption(image: Image.Image) -> str:
    return f"{image.width}x{image.height} rgb{image.getpixel((0, 0))}"


class FakeCaptioner:
    """Captions that name the image (size + first pixel), so any mix-up between requests shows.

    `gate` (an Event) blocks the model until set; `poison` is a colour the model fails on.
    """

    def __init__(self, gate: threading.Event | None = None, poison: tuple | None = None, delay: float = 0.0):
        self.calls: list[tuple[int, GenerationSettings]] = []
        self.gate, self.poison, self.delay = gate, poison, delay
        self.entered = threading.Event()

    def caption(self, images, batch_size=32, settings=None):
        assert batch_size >= len(images)  # the batcher asks for its whole batch in one call
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        settings = settings or GenerationSettings()
        self.calls.append((len(images), settings))
        if self.poison is not None and any(im.getpixel((0, 0)) == self.poison for im in images):
            raise RuntimeError("poisoned image")
        texts = [fake_caption(im) + (f" beams={settings.num_beams}" if settings.num_beams > 1 else "")
                 for im in images]
        n = settings.num_return_sequences
        return texts if n == 1 else [[f"{t} #{j}" for j in range(n)] for t in texts]


def config(**overrides) -> ServeConfig:
    batch = {k: overrides.pop(k) for k in list(overrides) if k in BatchConfig.__dataclass_fields__}
    return ServeConfig(batch=BatchConfig(**batch), warmup=False, **overrides)


@contextmanager
def fake_client(captioner=None, **overrides):
    captioner = captioner or FakeCaptioner()
    with TestClient(create_app(captioner, config(**overrides)), base_url="http://localhost") as client:
        client.captioner = captioner
        yield client


def error_of(response) -> dict:
    return response.json()["error"]


# --- endpoints, with a fake captioner ----------------------------------------------------------
def test_multipart_upload_captions_each_image_with_options():
    with fake_client() as c:
        r = c.post("/v1/captions", files=[("images", ("red.png", png(color=(255, 0, 0)), "image/png")),
                                          ("images", ("blue.jpg", png((10, 6), (0, 0, 255), fmt="JPEG"),
                                                      "image/jpeg"))],
                   data={"num_beams": "3", "max_new_tokens": "12"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [res["name"] for res in body["results"]] == ["red.png", "blue.jpg"]
        assert body["results"][0]["caption"] == "8x8 rgb(255, 0, 0) beams=3"
        assert body["results"][1]["caption"].startswith("10x6 rgb(") and body["results"][1]["caption"].endswith("beams=3")
        assert body["options"]["num_beams"] == 3 and body["options"]["max_new_tokens"] == 12
        # Both images went to the model in one call, with the options passed through.
        assert c.captioner.calls == [(2, GenerationSettings(num_beams=3, max_new_tokens=12))]


def test_json_with_base64_data_url_and_named_objects():
    b64 = base64.b64encode(png(color=(0, 255, 0))).decode()
    with fake_client() as c:
        r = c.post("/v1/captions", json={"images": [b64, f"data:image/png;base64,{b64}",
                                                    {"data": b64, "name": "green.png"}],
                                         "do_sample": True, "temperature": 0.7, "top_p": 0.9})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["name"] for x in results] == ["images[0]", "images[1]", "green.png"]
        assert {x["caption"] for x in results} == {"8x8 rgb(0, 255, 0)"}
        _, settings = c.captioner.calls[0]
        assert settings.do_sample is True and settings.temperature == 0.7 and settings.top_p == 0.9


def test_several_captions_per_image():
    with fake_client() as c:
        r = c.post("/v1/captions", json={"images": [base64.b64encode(png()).decode()],
                                         "num_beams": 3, "num_return_sequences": 3})
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["captions"] == [f"8x8 rgb(255, 0, 0) beams=3 #{j}" for j in range(3)]
        assert result["caption"] == result["captions"][0]


def test_healthz_model_page_and_openapi():
    with fake_client() as c:
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["batcher"]["model_calls"] == 0
        info = c.get("/v1/model").json()
        assert info["limits"]["max_num_beams"] == 5 and info["limits"]["max_queue"] == 256
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'id="file-input"' in page.text and "/v1/captions" in page.text
        schema = c.get("/openapi.json").json()
        body = schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"]
        assert set(body) == {"multipart/form-data", "application/json"}
        assert "CaptionJSONRequest" in schema["components"]["schemas"]
        assert "ImageSource" in schema["components"]["schemas"]
        assert c.get("/docs").status_code == 200


# --- bad input: 4xx with a message, never a 5xx -----------------------------------------------
def truncated_png() -> bytes:
    data = png((64, 64), (10, 20, 30))
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def test_one_bad_image_does_not_fail_the_others():
    with fake_client() as c:
        r = c.post("/v1/captions", files=[
            ("images", ("good.png", png(), "image/png")),
            ("images", ("notes.txt", b"just some text", "text/plain")),
            ("images", ("broken.png", truncated_png(), "image/png")),
            ("images", ("empty.png", b"", "image/png")),
            ("images", ("garbage.jpg", b"\xff\xd8\xff\xe0" + os.urandom(300), "image/jpeg")),
        ])
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[0]["caption"] == "8x8 rgb(255, 0, 0)"
        codes = [(x["error"]["code"], x["error"]["status"]) for x in results[1:]]
        assert codes[0] == ("not_an_image", 415)
        assert codes[1] == ("truncated_image", 422)
        assert codes[2] == ("empty_file", 422)
        assert codes[3][1] in (415, 422)
        for x in results[1:]:
            assert x["name"] in x["error"]["message"]  # the message names the image
        assert c.captioner.calls[0][0] == 1  # only the good image reached the model


@pytest.mark.parametrize("content,status,code", [
    (b"hello, not an image", 415, "not_an_image"),
    (None, 422, "truncated_image"),
])
def test_a_request_with_only_a_bad_image_is_4xx(content, status, code):
    content = truncated_png() if content is None else content
    with fake_client() as c:
        r = c.post("/v1/captions", files={"images": ("x.bin", content, "application/octet-stream")})
        assert r.status_code == status
        assert r.json()["results"][0]["error"]["code"] == code
        assert c.captioner.calls == []


@pytest.mark.parametrize("fields,needle", [
    ({"num_beams": "99"}, "--max_num_beams"),
    ({"num_beams": "0"}, "num_beams=0"),
    ({"num_beams": "three"}, "num_beams"),
    ({"max_new_tokens": "1000"}, "--max_new_tokens_limit"),
    ({"num_return_sequences": "3"}, "needs num_beams >= 3"),
    ({"do_sample": "true", "temperature": "0"}, "temperature=0.0"),
    ({"do_sample": "true", "top_p": "1.5"}, "top_p=1.5"),
    ({"num_beam": "2"}, "unknown field 'num_beam'"),
    ({"do_sample": "maybe"}, "do_sample"),
])
def test_bad_options_are_422_naming_the_option(fields, needle):
    with fake_client() as c:
        r = c.post("/v1/captions", files={"images": ("a.png", png(), "image/png")}, data=fields)
        assert r.status_code == 422, r.text
        assert error_of(r)["code"] == "bad_option" and needle in error_of(r)["message"]
        assert c.captioner.calls == []


def test_malformed_requests_are_4xx():
    with fake_client(max_images_per_request=2) as c:
        r = c.post("/v1/captions", content=b"plain", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "multipart/form-data" in error_of(r)["message"]
        r = c.post("/v1/captions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and error_of(r)["code"] == "bad_json"
        r = c.post("/v1/captions", json=["a list"])
        assert r.status_code == 422
        r = c.post("/v1/captions", json={"images": []})
        assert r.status_code == 400 and error_of(r)["code"] == "no_images"
        r = c.post("/v1/captions", json={"images": "abc"})
        assert r.status_code == 422
        r = c.post("/v1/captions", json={"images": [{"data": "aGk=", "url": "http://x"}]})
        assert r.status_code == 422 and r.json()["results"][0]["error"]["code"] == "bad_image_entry"
        r = c.post("/v1/captions", json={"images": ["%%%not base64"]})
        assert r.status_code == 422 and r.json()["results"][0]["error"]["code"] == "bad_base64"
        b64 = base64.b64encode(png()).decode()
        r = c.post("/v1/captions", json={"images": [b64] * 3})
        assert r.status_code == 413 and "--max_images_per_request" in error_of(r)["message"]
        r = c.post("/v1/captions", files=[("images", (f"{i}.png", png(), "image/png")) for i in range(3)])
        assert r.status_code == 413 and error_of(r)["code"] == "too_many_images"
        r = c.post("/v1/captions", files={"images": ("a.png", png(), "image/png")},
                   headers={"content-type": "multipart/form-data"})  # no boundary
        assert r.status_code == 400
        r = c.post("/v1/captions", files={"images": (None, "photo.jpg")})  # curl -F images=photo.jpg (no @)
        assert r.status_code == 422 and "-F images=@" in error_of(r)["message"]
        assert c.get("/v1/nothing").status_code == 404
        assert c.get("/v1/captions").status_code == 405
        assert c.captioner.calls == []


def test_upload_too_large_is_413_with_and_without_content_length():
    big = os.urandom(30_000)
    with fake_client(max_upload_bytes=20_000) as c:
        r = c.post("/v1/captions", files={"images": ("big.png", big, "image/png")})
        assert r.status_code == 413 and "--max_upload_mb" in error_of(r)["message"]

        def chunks():  # a generator body is sent chunked, with no Content-Length
            for i in range(0, len(big), 4096):
                yield big[i:i + 4096]

        r = c.post("/v1/captions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and error_of(r)["code"] == "too_large"
        # Under the limit still works.
        assert c.post("/v1/captions", files={"images": ("a.png", png(), "image/png")}).status_code == 200


def test_too_many_pixels_is_refused_before_decoding(monkeypatch):
    bomb = png((3000, 3000), 0, mode="L")  # 9 Mpx of zeros: a few KB compressed
    assert len(bomb) < 50_000
    with fake_client(max_image_pixels=1_000_000) as c:
        r = c.post("/v1/captions", files={"images": ("bomb.png", bomb, "image/png")})
        assert r.status_code == 413
        err = r.json()["results"][0]["error"]
        assert err["code"] == "too_many_pixels" and "3000x3000" in err["message"]
    # PIL's own check (its global limit, set by `prefixcap serve`) is caught as well.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with fake_client(max_image_pixels=10**9) as c:
        r = c.post("/v1/captions", files={"images": ("bomb.png", png((100, 100)), "image/png")})
        assert r.status_code == 413 and r.json()["results"][0]["error"]["code"] == "too_many_pixels"


def test_model_failure_on_one_image_leaves_its_batch_mates_captioned():
    with fake_client(FakeCaptioner(poison=(255, 0, 255))) as c:
        r = c.post("/v1/captions", files=[("images", ("ok.png", png(color=(1, 2, 3)), "image/png")),
                                          ("images", ("poison.png", png(color=(255, 0, 255)), "image/png"))])
        assert r.status_code == 200
        ok, bad = r.json()["results"]
        assert ok["caption"] == "8x8 rgb(1, 2, 3)"
        assert bad["error"]["code"] == "model_error" and "poisoned" in bad["error"]["message"]
        assert [n for n, _ in c.captioner.calls] == [2, 1, 1]  # the batch, then one image at a time


def test_image_urls_are_off_by_default_and_fetched_when_allowed(tmp_path):
    (tmp_path / "cat.png").write_bytes(png(color=(7, 8, 9)))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with fake_client() as c:
            r = c.post("/v1/captions", json={"images": [{"url": f"{url}/cat.png"}]})
            assert r.status_code == 403 and "--allow_urls" in r.json()["results"][0]["error"]["message"]
        with fake_client(allow_urls=True) as c:
            r = c.post("/v1/captions", json={"images": [{"url": f"{url}/cat.png", "name": "cat"},
                                                        {"url": f"{url}/missing.png"},
                                                        {"url": "file:///etc/passwd"}]})
            assert r.status_code == 200
            cat, missing, local = r.json()["results"]
            assert cat["caption"] == "8x8 rgb(7, 8, 9)"
            assert missing["error"]["code"] == "url_fetch_failed" and "404" in missing["error"]["message"]
            assert local["error"]["code"] == "bad_url"
    finally:
        httpd.shutdown()


# --- batching, queue bound, timeout ------------------------------------------------------------
def test_batcher_groups_by_options_and_batches_concurrent_requests():
    captioner = FakeCaptioner(delay=0.02)

    async def scenario():
        batcher = DynamicBatcher(captioner, BatchConfig(max_batch_size=8, max_wait_ms=50, max_queue=100))
        await batcher.start()
        try:
            images = [Image.new("RGB", (4 + i, 4), (i, 0, 0)) for i in range(24)]
            greedy, beam = GenerationSettings(), GenerationSettings(num_beams=2)
            jobs = [batcher.submit([im], greedy if i % 2 else beam) for i, im in enumerate(images)]
            results = await asyncio.gather(*jobs)
            with pytest.raises(QueueFull):
                await batcher.submit([images[0]] * 101, greedy)
            return images, results, batcher.stats
        finally:
            await batcher.stop()

    images, results, stats = asyncio.run(scenario())
    for i, (image, result) in enumerate(zip(images, results)):
        assert result == [[fake_caption(image) + ("" if i % 2 else " beams=2")]]
    # Each model call saw one set of options, and 24 requests needed far fewer than 24 calls.
    assert {s.num_beams for _, s in captioner.calls} == {1, 2}
    assert sum(n for n, _ in captioner.calls) == 24
    assert stats.model_calls == len(captioner.calls) <= 6
    assert stats.largest_batch == 8 and stats.rejected_queue_full == 1


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_full_queue_is_503_with_retry_after_then_recovers():
    gate = threading.Event()
    captioner = FakeCaptioner(gate=gate)
    app = create_app(captioner, config(max_batch_size=1, max_wait_ms=0, max_queue=2))
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        def post(color):
            return client.post("/v1/captions", files={"images": ("a.png", png(color=color), "image/png")})

        answers = {}
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, post((i, i, i)))) for i in range(3)]
        threads[0].start()
        wait_for(captioner.entered.is_set)  # request 0 is on the model, blocked
        for t in threads[1:]:
            t.start()
        wait_for(lambda: client.get("/healthz").json()["batcher"]["queue_depth"] == 2)
        r = post((9, 9, 9))
        assert r.status_code == 503 and error_of(r)["code"] == "queue_full"
        assert int(r.headers["Retry-After"]) >= 1
        assert client.get("/healthz").status_code == 200  # the loop stays responsive meanwhile
        gate.set()
        for t in threads:
            t.join(30)
        assert [answers[i].json()["results"][0]["caption"] for i in range(3)] == \
            [f"8x8 rgb({i}, {i}, {i})" for i in range(3)]
        assert post((5, 5, 5)).status_code == 200
        assert client.get("/healthz").json()["batcher"]["rejected_queue_full"] == 1


def test_request_timeout_is_503_and_frees_the_queue():
    gate = threading.Event()
    captioner = FakeCaptioner(gate=gate)
    app = create_app(captioner, config(max_batch_size=1, max_wait_ms=0, request_timeout_s=0.3))
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault(
            "r", client.post("/v1/captions", files={"images": ("a.png", png(), "image/png")})))
        t.start()
        wait_for(captioner.entered.is_set)
        r = client.post("/v1/captions", files={"images": ("b.png", png(color=(0, 0, 1)), "image/png")})
        assert r.status_code == 503 and error_of(r)["code"] == "timeout" and "Retry-After" in r.headers
        t.join(30)
        assert first["r"].status_code == 503  # the one on the model timed out as well
        stats = client.get("/healthz").json()["batcher"]
        assert stats["timeouts"] == 2 and stats["queue_depth"] == 0  # the queued one was dropped
        gate.set()
        r = client.post("/v1/captions", files={"images": ("c.png", png(color=(0, 0, 2)), "image/png")})
        assert r.status_code == 200 and r.json()["results"][0]["caption"] == "8x8 rgb(0, 0, 2)"


# --- the real captioner from tiny models --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_artifact(tiny_clip, tiny_gpt2, tmp_path_factory) -> str:
    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel

    model = CaptionModel(CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                                       mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32, prefix_length=4)))
    return str(model.save_pretrained(tmp_path_factory.mktemp("serve") / "tiny_captioner"))


@pytest.fixture(scope="module")
def tiny_captioner(tiny_artifact):
    from prefixcap.caption.captioner import Captioner

    return Captioner.from_pretrained(tiny_artifact, device="cpu")


def load_images(n_random=6) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n_random)]
    images += [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]]
    return images


def encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_model_info_describes_the_real_model(tiny_captioner, tiny_artifact, tiny_clip, tiny_gpt2):
    cfg = config(model=tiny_artifact, max_new_tokens_limit=20)
    cfg.warmup = True
    with TestClient(create_app(tiny_captioner, cfg), base_url="http://localhost") as c:
        info = c.get("/v1/model").json()
        # Local paths appear by their folder's name only: never the server's file layout.
        assert info["model"] == Path(tiny_artifact).name
        assert info["encoder"]["name"] == Path(tiny_clip).name and info["encoder"]["embedding_dim"] == 16
        assert info["language_model"] == {"name": Path(tiny_gpt2).name, "family": "causal"}
        assert info["prefix_length"] == 4 and info["mapping"]["mapping_type"] == "mlp"
        # The model was trained with max_token_length 128; the server caps the default at its limit.
        assert info["limits"]["default_max_new_tokens"] == 20
        assert c.get("/healthz").json()["batcher"]["model_calls"] == 0  # the warm-up is not counted


def test_load_many_concurrent_clients_are_batched(tiny_captioner, tiny_artifact):
    """A few hundred concurrent requests, a fifth malformed: no 5xx, every good one answered
    correctly, queue and memory bounded, and far fewer model calls than requests."""
    import psutil

    images = load_images()
    blobs = [encode(im) for im in images]
    greedy = {"max_new_tokens": "6"}
    beam = {"max_new_tokens": "6", "num_beams": "2"}
    expected_greedy = tiny_captioner.caption(images, batch_size=len(images), max_new_tokens=6)
    expected_beam = tiny_captioner.caption(images, batch_size=len(images), max_new_tokens=6, num_beams=2)
    cfg = config(model=tiny_artifact, max_batch_size=32, max_wait_ms=20, max_queue=512)
    n_requests = 300
    app = create_app(tiny_captioner, cfg)
    process = psutil.Process()

    async def one(client, i):
        kind = i % 10
        if kind == 7:  # malformed: not an image
            r = await client.post("/v1/captions", files={"images": ("x.txt", b"text " * i, "text/plain")})
            return i, "bad", r
        if kind == 8:  # malformed: a bad option
            r = await client.post("/v1/captions", files={"images": ("a.png", blobs[0], "image/png")},
                                  data={"num_beams": "50"})
            return i, "bad", r
        options, want = (beam, expected_beam) if kind == 9 else (greedy, expected_greedy)
        j = i % len(images)
        if i % 3 == 0:  # a third of the good ones as JSON
            r = await client.post("/v1/captions", json={"images": [base64.b64encode(blobs[j]).decode()],
                                                        **{k: int(v) for k, v in options.items()}})
        else:
            r = await client.post("/v1/captions", files={"images": (f"{j}.png", blobs[j], "image/png")},
                                  data=options)
        return i, want[j], r

    async def run(url):
        limits = httpx.Limits(max_connections=n_requests, max_keepalive_connections=n_requests)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            start = time.perf_counter()
            answers = await asyncio.gather(*(one(client, i) for i in range(n_requests)))
            elapsed = time.perf_counter() - start
            health = (await client.get("/healthz")).json()
        return answers, elapsed, health

    rss_before = process.memory_info().rss
    with background_server(app) as url:
        answers, elapsed, health = asyncio.run(run(url))
    rss_growth_mb = (process.memory_info().rss - rss_before) / 2**20

    statuses = [r.status_code for _, _, r in answers]
    assert not [s for s in statuses if s >= 500], f"5xx answers: {sorted(set(statuses))}"
    good = [(i, want, r) for i, want, r in answers if want != "bad"]
    bad = [(i, r) for i, want, r in answers if want == "bad"]
    for i, want, r in good:
        assert r.status_code == 200, (i, r.text)
        assert r.json()["results"][0]["caption"] == want, i
    assert all(400 <= r.status_code < 500 for _, r in bad)
    stats = health["batcher"]
    assert stats["images_captioned"] == len(good)
    assert stats["model_calls"] < len(good) / 4, stats  # batching happened
    assert stats["max_queue_depth"] <= cfg.batch.max_queue
    assert rss_growth_mb < 300, f"RSS grew by {rss_growth_mb:.0f} MB"
    print(f"\nload test: {n_requests} requests ({len(good)} good) in {elapsed:.2f} s = "
          f"{n_requests / elapsed:.1f} req/s; {stats['model_calls']} model calls, mean batch "
          f"{stats['mean_batch_size']}, largest {stats['largest_batch']}; RSS +{rss_growth_mb:.0f} MB")


def test_prefixcap_serve_command_loads_the_model_and_serves_it(tiny_artifact, monkeypatch):
    """`prefixcap serve ...` end to end in this process; only the uvicorn run is replaced, by a
    loopback server we can stop (a subprocess would spend most of its time importing torch)."""
    from prefixcap import cli
    from prefixcap.serve import http as serve_http

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # main() sets it; restore after
    seen = {}

    def fake_run(app, config, sock):
        seen.update(host=config.host, bound=sock.getsockname()[0])  # bound before the model loaded
        sock.close()
        with background_server(app, host=config.host) as url, httpx.Client(base_url=url, timeout=60) as client:
            seen["info"] = client.get("/v1/model").json()
            seen["ok"] = client.post("/v1/captions", files={"images": ("a.png", png((32, 32)), "image/png")},
                                     data={"max_new_tokens": "4"})
            seen["bomb"] = client.post("/v1/captions",
                                       files={"images": ("big.png", png((1000, 1000), 0, "L"), "image/png")})

    monkeypatch.setattr(serve_http, "run_server", fake_run)
    rc = cli.main(["serve", "--model", tiny_artifact, "--port", "0", "--max_image_pixels", "500000",
                   "--max_batch_size", "4", "--log_level", "warning"])
    assert rc == 0
    assert seen["host"] == "127.0.0.1" and seen["bound"] == "127.0.0.1"
    assert Image.MAX_IMAGE_PIXELS == 500000  # PIL's own bomb check agrees with the flag
    assert seen["info"]["model"] == Path(tiny_artifact).name
    assert seen["info"]["limits"]["max_image_pixels"] == 500000 and seen["info"]["limits"]["max_batch_size"] == 4
    assert seen["ok"].status_code == 200 and isinstance(seen["ok"].json()["results"][0]["caption"], str)
    assert seen["bomb"].status_code == 413


def test_serve_command_reports_a_missing_model(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err
