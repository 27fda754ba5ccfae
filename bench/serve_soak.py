"""Soak test of `prefixcap serve` on loopback: mixed, partly hostile traffic; 5xx, errors and RSS.

Starts the real command in a subprocess around a tiny random model, then for `--seconds` keeps
`--concurrency` clients busy with: ordinary captions (multipart and JSON), ~10 % malformed
requests (deep JSON nesting, NaN, a 5,001-digit integer, bad options, bad base64, not an image),
a few thin images (16 x 1,562,500 px PNGs, at the default pixel limit) and a few 19 MB bodies.
It samples the server's RSS throughout and prints one JSON object of figures:

    python bench/serve_soak.py --seconds 60 --concurrency 64

Only loopback addresses; every loop is bounded by the duration or a count.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

# Every how-many-th request is which kind (the rest are ordinary captions).
MALFORMED_SHARE = 0.10
THIN_EVERY = 150
BIG_EVERY = 100


def build_tiny_artifact(workdir: Path) -> Path:
    """A tiny random captioner (CLIP + GPT-2 + MLP mapping) saved as a model folder."""
    from prefixcap.demo import tiny_models
    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel

    clip = tiny_models.build_tiny_clip(workdir / "clip")
    gpt2 = tiny_models.build_tiny_gpt2(workdir / "gpt2")
    model = CaptionModel(CaptionConfig(clip_model=str(clip), language_model=str(gpt2), lm_family="causal",
                                       mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32, prefix_length=4)))
    return Path(model.save_pretrained(workdir / "tiny_captioner"))


# --- payloads ------------------------------------------------------------------------------------
def png_bytes(width: int, height: int, seed: int, mode: str = "RGB") -> bytes:
    import numpy as np
    from PIL import Image

    channels = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def thin_png(width: int = 16, height: int = 1_562_500) -> bytes:
    """A PNG of width x height black pixels written directly (PIL would allocate all of it): ~25 KB."""
    raw = b"\x00" * (width + 1)  # one scanline (filter byte + pixels), repeated below
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(raw) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def big_json_body(target_bytes: int = 19 * 2**20) -> bytes:
    """A JSON request of about target_bytes: one noisy PNG, base64-encoded."""
    side = int(((target_bytes * 3 / 4) / 3) ** 0.5)
    image = png_bytes(side, side, seed=7)
    return json.dumps({"images": [base64.b64encode(image).decode()], "max_new_tokens": 4}).encode()


class Payloads:
    def __init__(self):
        self.small = [png_bytes(32 + i, 40, seed=i) for i in range(8)]
        self.small_b64 = [base64.b64encode(b).decode() for b in self.small]
        self.thin = thin_png()
        self.big = big_json_body()
        b64 = self.small_b64[0]
        self.malformed = [
            ("application/json", b"[" * 100_000),
            ("application/json", b'{"images": ["%s"], "num_beams": %s}' % (b64.encode(), b"9" * 5001)),
            ("application/json", b'{"images": ["%s"], "temperature": NaN, "do_sample": true}' % b64.encode()),
            ("application/json", json.dumps({"images": [b64], "do_sample": True, "temperature": 1e-300}).encode()),
            ("application/json", json.dumps({"images": [b64], "num_beams": -3}).encode()),
            ("application/json", json.dumps({"images": ["%%% not base64"]}).encode()),
            ("application/json", b'{"images": 5}'),
            ("text/plain", b"hello"),
        ]


# --- the client side -----------------------------------------------------------------------------
async def one_request(client, i: int, rng: random.Random, p: Payloads) -> tuple[str, int | str]:
    """(kind, status or exception name) of request number i."""
    import httpx

    if i % THIN_EVERY == THIN_EVERY - 1:
        kind, call = "thin", dict(files={"images": ("thin.png", p.thin, "image/png")}, data={"max_new_tokens": "4"})
    elif i % BIG_EVERY == BIG_EVERY // 2:
        kind, call = "big", dict(content=p.big, headers={"content-type": "application/json"})
    elif rng.random() < MALFORMED_SHARE:
        ctype, body = p.malformed[i % len(p.malformed)]
        kind, call = "malformed", dict(content=body, headers={"content-type": ctype})
    elif i % 2:
        j = i % len(p.small)
        kind, call = "valid", dict(files={"images": (f"{j}.png", p.small[j], "image/png")},
                                   data={"max_new_tokens": "6"})
    else:
        kind, call = "valid", dict(json={"images": [p.small_b64[i % len(p.small)]], "max_new_tokens": 6})
    start = time.monotonic()
    try:
        r = await client.post("/v1/captions", **call)
        return kind, r.status_code
    except httpx.HTTPError as err:
        # The time it failed after tells a reused connection closed under the request (~0 s) from one
        # dropped while the request was being read or answered.
        return kind, f"{type(err).__name__} after {time.monotonic() - start:.1f} s: {str(err)[:60]}"


async def drive(url: str, seconds: float, concurrency: int, p: Payloads) -> tuple[Counter, int]:
    import httpx

    outcomes: Counter = Counter()
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker(w: int) -> None:
            rng = random.Random(w)
            while time.monotonic() < deadline:
                kind, outcome = await one_request(client, next(counter), rng, p)
                outcomes[(kind, outcome)] += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return outcomes, next(counter)


# --- the server side -----------------------------------------------------------------------------
class RssSampler:
    """Samples a process's RSS every `period_s` in a thread."""

    def __init__(self, pid: int, period_s: float = 0.2):
        import psutil

        self.process = psutil.Process(pid)
        self.period_s, self.peak, self.samples = period_s, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return self.process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            rss = self.now()
            self.peak = max(self.peak, rss)
            self.samples.append(rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_server(artifact: Path, extra_args: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "prefixcap.cli", "serve", "--model", str(artifact), "--host", "127.0.0.1",
           "--port", "0", "--log_level", "error", *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for _ in range(50):  # a few lines at most before the URL
        line = proc.stdout.readline()
        if not line:
            break
        if "http://" in line:
            return proc, "http://" + line.split("http://", 1)[1].split("/", 1)[0]
    proc.kill()
    raise RuntimeError("prefixcap serve did not start")


def wait_ready(url: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout_s} s")


def soak(seconds: float, concurrency: int, workdir: Path, extra_args: list[str] | None = None,
         settle_s: float = 15.0) -> dict:
    """Run the soak; the figures as a dict (also what the slow test asserts on)."""
    import httpx

    artifact = build_tiny_artifact(workdir)
    payloads = Payloads()
    proc, url = start_server(artifact, extra_args or [])
    try:
        wait_ready(url)
        with RssSampler(proc.pid) as rss:
            cold = rss.now()  # model loaded, nothing served yet
            asyncio.run(drive(url, 3, 8, payloads))  # warm-up: imports, thread pools, allocator
            time.sleep(1)
            baseline = rss.now()
            start = time.monotonic()
            outcomes, n = asyncio.run(drive(url, seconds, concurrency, payloads))
            elapsed = time.monotonic() - start
            after, settle_deadline = rss.now(), time.monotonic() + settle_s
            while after - baseline > 100 * 2**20 and time.monotonic() < settle_deadline:
                time.sleep(0.5)
                after = rss.now()
            stats = httpx.get(f"{url}/healthz", timeout=10).json()["batcher"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    by_kind: dict[str, Counter] = {}
    for (kind, outcome), count in outcomes.items():
        by_kind.setdefault(kind, Counter())[str(outcome)] += count
    mb = 2**20
    return {
        "seconds": round(elapsed, 1), "concurrency": concurrency, "requests": n,
        "requests_per_s": round(n / elapsed, 1),
        "outcomes": {kind: dict(c) for kind, c in sorted(by_kind.items())},
        "server_5xx": sum(c for (k, o), c in outcomes.items() if isinstance(o, int) and o >= 500),
        "valid_connection_errors": sum(c for (k, o), c in outcomes.items() if k == "valid" and isinstance(o, str)),
        "valid_not_200": sum(c for (k, o), c in outcomes.items() if k == "valid" and o != 200),
        "other_connection_errors": sum(c for (k, o), c in outcomes.items() if k != "valid" and isinstance(o, str)),
        "rss_baseline_mb": round(baseline / mb), "rss_peak_growth_mb": round((rss.peak - baseline) / mb),
        "rss_after_growth_mb": round((after - baseline) / mb),
        "rss_cold_mb": round(cold / mb), "rss_after_mb": round(after / mb),
        "model_calls": stats["model_calls"], "mean_batch_size": stats["mean_batch_size"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--server_args", default="", help="extra `prefixcap serve` flags, space-separated")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prefixcap-soak-") as tmp:
        figures = soak(args.seconds, args.concurrency, Path(tmp), args.server_args.split())
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
