"""`prefixcap serve` as a real process (issue 24): refusals at the limits, early answers, the end of a shutdown.

One server for the module (loading torch costs seconds); the shutdown test ends it, so it comes last.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_UPLOAD_MB = 11
MAX_CONNECTIONS = 150


@pytest.fixture(scope="module")
def tiny_artifact(tiny_clip, tiny_gpt2, tmp_path_factory) -> str:
    from prefixcap.model import CaptionConfig, CaptionModel
    from prefixcap.model.mapping import MappingConfig

    model = CaptionModel(CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                                       mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32, prefix_length=4)))
    return str(model.save_pretrained(tmp_path_factory.mktemp("serve_process") / "tiny_captioner"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_artifact):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "prefixcap.cli", "serve", "--model", tiny_artifact,
                             "--port", str(port),
                             "--device", "cpu", "--max_connections", str(MAX_CONNECTIONS),
                             "--max_upload_mb", str(MAX_UPLOAD_MB), "--allowed_hosts", "*.example.com,127.0.0.1",
                             "--graceful_shutdown_s", "1", "--body_timeout_s", "30", "--keep_alive_s", "30",
                             "--log_level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield proc, port, url
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _error(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/json", response.text
    return response.json()["error"]


def test_an_early_415_within_the_upload_limit_reaches_an_asyncio_client(server):
    _, _, url = server
    body = b"x" * (10 << 20)  # 10 MB of not-an-image, within --max_upload_mb 11

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return [await client.post(url + "/v1/captions", content=body, headers={"content-type": "text/plain"})
                    for _ in range(3)]

    for response in asyncio.run(run()):  # a connection error here is the defect: the answer lost to a reset
        assert response.status_code == 415 and _error(response)["code"] == "unsupported_content_type"


def test_an_upload_of_exactly_max_upload_mb_is_accepted_and_one_byte_more_refused(server):
    _, _, url = server
    limit = MAX_UPLOAD_MB << 20
    with httpx.Client(timeout=30) as client:
        exact = client.post(url + "/v1/captions", content=b"x" * limit, headers={"content-type": "text/plain"})
        over = client.post(url + "/v1/captions", content=b"x" * (limit + 1), headers={"content-type": "text/plain"})
    assert exact.status_code == 415, exact.text  # past the size guard: refused for its type only
    assert over.status_code == 413 and _error(over)["code"] == "too_large"


@pytest.mark.parametrize("host, allowed", [("a.example.com", True), ("A.Example.com:8000", True),
                                           ("evilexample.com", False), ("example.com", False)])
def test_allowed_hosts_wildcard_admits_subdomains_only(server, host, allowed):
    _, _, url = server
    response = httpx.get(url + "/healthz", headers={"host": host}, timeout=10)
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400 and _error(response)["code"] == "bad_host"


def _raw_request(port: int, body_sent: int = 10) -> socket.socket:
    """A POST whose headers arrived and whose body is still coming: a request in progress."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b" " * body_sent)
    return sock


def _read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_at_max_connections_only_the_requests_over_it_get_a_json_503(server):
    _, port, url = server
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS + 50):  # 200 requests in progress at once
            socks.append(_raw_request(port))
        answered, deadline = set(), time.time() + 15
        while time.time() < deadline and len(answered) < 50:
            ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.5)
            answered.update(ready)
        time.sleep(0.5)  # a 51st answer would be a request refused under the limit
        answered.update(select.select([s for s in socks if s not in answered], [], [], 0)[0])
        assert len(answered) == 50
        for sock in answered:
            status, headers, body = _read_response(sock)
            assert status == 503 and headers["content-type"] == "application/json" and "retry-after" in headers
            assert json.loads(body)["error"]["code"] == "busy"
    finally:
        for sock in socks:
            sock.close()
    # idle kept-alive connections hold no request: with MAX_CONNECTIONS of them open, a new client is served
    time.sleep(0.5)
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            idle.append(sock)
        for sock in idle:
            assert _read_response(sock)[0] == 200
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        # ... and the open connections stay bounded: one idle connection was closed to make room for it
        ready, _, _ = select.select(idle, [], [], 2)
        assert ready and ready[0].recv(1) == b""
    finally:
        for sock in idle:
            sock.close()


def test_a_request_cut_by_the_end_of_graceful_shutdown_gets_a_json_503(server):
    proc, port, _ = server  # last in the module: this ends the server
    sock = _raw_request(port)
    try:
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        status, headers, body = _read_response(sock, timeout=15)  # --graceful_shutdown_s 1
    finally:
        sock.close()
    assert status == 503 and headers["content-type"] == "application/json" and "retry-after" in headers
    assert json.loads(body)["error"]["code"] == "shutting_down"
    _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err[-2000:]
