"""The HTTP service under hostile and careless clients: no 5xx from input, connections and memory bounded."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import h11  # noqa: E402
import httpx  # noqa: E402

from prefixcap.serve import app as serve  # noqa: E402
from prefixcap.serve.app import create_app  # noqa: E402
from prefixcap.serve.requests import parse_json_body  # noqa: E402
from prefixcap.serve.http import background_server  # noqa: E402
from prefixcap.serve.guards import ApiError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import FakeCaptioner, config, png  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")
B64 = base64.b64encode(png()).decode()


# --- a raw HTTP/1.1 client: one socket, so connection reuse and closing are visible ----------------
class RawConnection:
    """One TCP connection to the server, spoken with h11 (httpx would hide reconnects)."""

    def __init__(self, url: str, timeout: float = 10.0):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)
        self.host = f"{host}:{port}"

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple:
        """(status, headers dict, body bytes) of one request on this connection."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = {"host": self.host, "content-length": str(len(body)), **(headers or {})}
        self.sock.sendall(self.conn.send(h11.Request(method=method, target=path, headers=list(hdrs.items()))))
        self.sock.sendall(self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))
        return self.read_response()

    def read_response(self) -> tuple:
        status, headers, chunks = None, {}, []
        for _ in range(100_000):  # bounded: each round reads or finishes
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return status, headers, b"".join(chunks)

    def closed_by_server(self, within_s: float) -> bool:
        """True if the server closes the socket within `within_s` (EOF or reset)."""
        self.sock.settimeout(within_s)
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server():
    """A loopback server around a fake captioner with short deadlines; yields (url, app)."""
    app = create_app(FakeCaptioner(), config(header_timeout_s=1.0, body_timeout_s=1.0, max_upload_bytes=2_000_000,
                                             max_inflight_bytes=3_000_000))
    with background_server(app) as url:
        yield url, app


def error_code(status: int, body: bytes) -> str:
    """The error code of a JSON error answer: the whole request's, or its only image's."""
    payload = json.loads(body)
    if "error" in payload:
        err = payload["error"]
    else:
        (result,) = payload["results"]
        err = result["error"]
    assert err["status"] == status and err["message"]
    return err["code"]


# --- malformed bodies: always a 4xx JSON error, and the connection stays usable --------------------
def _json(obj: dict) -> bytes:
    return json.dumps({"images": [B64], **obj}).encode()


MALFORMED = {
    "deep_nesting": (b"[" * 100_000, 400, "bad_json"),
    "deep_objects": (b'{"a":' * 40 + b"1" + b"}" * 40, 400, "bad_json"),
    "huge_integer": (b'{"images": ["%s"], "num_beams": %s}' % (B64.encode(), b"9" * 5001), 400, "bad_json"),
    "huge_float": (b'{"images": ["%s"], "temperature": 1e400, "do_sample": true}' % B64.encode(), 400, "bad_json"),
    "nan": (b'{"images": ["%s"], "temperature": NaN, "do_sample": true}' % B64.encode(), 400, "bad_json"),
    "infinity": (b'{"images": ["%s"], "top_p": Infinity}' % B64.encode(), 400, "bad_json"),
    "minus_infinity": (b'{"images": ["%s"], "temperature": -Infinity}' % B64.encode(), 400, "bad_json"),
    "not_utf8": (b'{"images": ["\xff\xfe"]}', 400, "bad_json"),
    "truncated": (b'{"images": ["abc"', 400, "bad_json"),
    "temperature_1e-300": (_json({"do_sample": True, "temperature": 1e-300}), 422, "bad_option"),
    "temperature_1e-40": (_json({"do_sample": True, "temperature": 1e-40}), 422, "bad_option"),
    "temperature_huge": (_json({"do_sample": True, "temperature": 1e300}), 422, "bad_option"),
    "negative_beams": (_json({"num_beams": -1}), 422, "bad_option"),
    "huge_beams": (_json({"num_beams": 10**15}), 422, "bad_option"),
    "beams_as_text": (_json({"num_beams": "3"}), 422, "bad_option"),
    "beams_as_list": (_json({"num_beams": [3]}), 422, "bad_option"),
    "do_sample_as_text": (_json({"do_sample": "yes"}), 422, "bad_option"),
    "temperature_as_object": (_json({"do_sample": True, "temperature": {"x": 1}}), 422, "bad_option"),
    "unknown_option": (_json({"beams": 3}), 422, "bad_option"),
    "body_is_list": (b"[1, 2]", 422, "bad_request"),
    "body_is_string": (b'"hello"', 422, "bad_request"),
    "body_is_null": (b"null", 422, "bad_request"),
    "images_not_list": (b'{"images": 5}', 422, "bad_request"),
    "image_is_number": (b'{"images": [5]}', 422, "bad_image_entry"),
    "image_data_is_number": (b'{"images": [{"data": 5}]}', 422, "bad_image_entry"),
    "bad_base64": (b'{"images": ["%%% not base64"]}', 422, "bad_base64"),
    "brackets_in_a_string": (json.dumps({"images": ["[" * 1000]}).encode(), 422, "bad_base64"),
    "empty_body": (b"", 400, "bad_json"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_json_is_a_4xx_json_error_and_the_connection_stays_usable(server, case):
    url, _ = server
    body, want_status, want_code = MALFORMED[case]
    conn = RawConnection(url)
    try:
        status, headers, answer = conn.request("POST", "/v1/captions", body, {"content-type": "application/json"})
        assert status == want_status, answer[:300]
        assert headers["content-type"] == "application/json"
        assert error_code(status, answer) == want_code
        # Knock-on: the same connection carries an ordinary request next, unless the server said close.
        assert headers.get("connection") != "close"
        status, _, answer = conn.request("POST", "/v1/captions", _json({}), {"content-type": "application/json"})
        assert status == 200 and json.loads(answer)["results"][0]["caption"] == "8x8 rgb(255, 0, 0)"
    finally:
        conn.close()


@pytest.mark.parametrize("ctype,body,status,code", [
    ("text/plain", b"hello", 415, "unsupported_content_type"),
    (None, b"hello", 415, "unsupported_content_type"),
    ("multipart/form-data", b"--x\r\n", 400, "http_error"),  # no boundary
    ("multipart/form-data; boundary=x", b"garbage without parts", 400, "http_error"),
])
def test_bad_content_types_are_4xx_json(server, ctype, body, status, code):
    url, _ = server
    conn = RawConnection(url)
    try:
        got, headers, answer = conn.request("POST", "/v1/captions", body, {"content-type": ctype} if ctype else {})
        assert got == status and error_code(got, answer) == code
        if headers.get("connection") != "close":
            assert conn.request("GET", "/healthz")[0] == 200
    finally:
        conn.close()


def test_parse_json_body_guards():
    assert parse_json_body(b'{"a": [1, 2.5, "x[[["]}') == {"a": [1, 2.5, "x[[["]}
    assert parse_json_body(b"[" * 32 + b"]" * 32) is not None  # at the depth limit
    for bad in (b"[" * 33 + b"]" * 33, b"1" * 19, b"NaN", b"1e999", b"[" * 100_000):
        with pytest.raises(ApiError) as err:
            parse_json_body(bad)
        assert err.value.status == 400


def test_a_server_fault_is_a_json_500_that_closes_the_connection(server, monkeypatch):
    url, _ = server

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serve, "image_results", broken)
    conn = RawConnection(url)
    try:
        status, headers, answer = conn.request("POST", "/v1/captions", _json({}), {"content-type": "application/json"})
        assert status == 500 and headers["connection"] == "close"
        assert error_code(500, answer) == "internal_error" and "a bug" not in answer.decode()
        assert conn.closed_by_server(5)
    finally:
        conn.close()


# --- bodies: size, bytes in flight, deadline ----------------------------------------------------
def test_413_is_answered_early_and_the_connection_closed_without_reading_the_body(server):
    url, _ = server
    conn = RawConnection(url)
    head = (f"POST /v1/captions HTTP/1.1\r\nhost: {conn.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {100 * 2**20}\r\n\r\n").encode()
    sent = 0
    try:
        conn.sock.sendall(head)
        conn.sock.settimeout(0.05)
        reply = b""
        chunk = b"x" * 65536
        for _ in range(2000):  # at most 125 MB: more than the announced body
            try:
                sent += conn.sock.send(chunk)
            except (BlockingIOError, TimeoutError):
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                data = conn.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            reply += data
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"connection: close" in reply.lower() and b'"too_large"' in reply
        assert sent < 20 * 2**20, f"the server read {sent} bytes of a refused body"
    finally:
        conn.close()


def test_chunked_body_over_the_limit_is_413(server):
    url, _ = server

    def chunks():
        for _ in range(40):  # 2.6 MB > the 2 MB limit
            yield b"x" * 65536

    r = httpx.post(f"{url}/v1/captions", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert r.headers["connection"] == "close"


def test_bodies_in_flight_are_bounded_503_with_retry_after():
    app = create_app(FakeCaptioner(), config(max_upload_bytes=2_000_000, max_inflight_bytes=3_000_000))
    with background_server(app) as url:
        _check_budget(url, app)


def _check_budget(url, app):
    holder = RawConnection(url)
    try:  # a slow upload holds 1.9 MB of the 3 MB budget ...
        holder.sock.sendall((f"POST /v1/captions HTTP/1.1\r\nhost: {holder.host}\r\n"
                             "content-type: application/json\r\ncontent-length: 1900000\r\n\r\n").encode())
        deadline = time.monotonic() + 5
        while app.state.body_budget.used == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.body_budget.used == 1_900_000
        # ... so a second 1.9 MB body waits briefly for room, then is refused with Retry-After.
        start = time.monotonic()
        r = httpx.post(f"{url}/v1/captions", content=b"{" + b" " * 1_899_998 + b"}",
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "busy"
        assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
        assert time.monotonic() - start >= 1.5
        small = httpx.post(f"{url}/v1/captions", json={"images": [B64]}, timeout=30)
        assert small.status_code == 200  # small bodies still fit
    finally:
        holder.close()
    deadline = time.monotonic() + 5
    while app.state.body_budget.used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.state.body_budget.used == 0  # released when the slow client went away


def test_a_slow_body_is_cut_off_with_408(server):
    url, _ = server
    conn = RawConnection(url)
    try:
        conn.sock.sendall((f"POST /v1/captions HTTP/1.1\r\nhost: {conn.host}\r\n"
                           "content-type: application/json\r\ncontent-length: 1000\r\n\r\n").encode())
        start = time.monotonic()
        for _ in range(8):  # one byte every 0.2 s: far slower than the body deadline allows
            try:
                conn.sock.sendall(b" ")
            except OSError:
                break
            time.sleep(0.2)
        status, headers, body = conn.read_response()
        assert status == 408 and error_code(408, body) == "body_timeout"
        assert headers["connection"] == "close" and conn.closed_by_server(3)
        assert time.monotonic() - start < 4
    finally:
        conn.close()


@pytest.mark.parametrize("sent", [b"", b"POST /v1/captions HTTP/1.1\r\nhost: x\r\n"])
def test_a_slow_or_silent_header_is_cut_off(server, sent):
    url, _ = server
    conn = RawConnection(url)
    try:
        start = time.monotonic()
        conn.sock.sendall(sent)
        closed = False
        for _ in range(30):  # a header byte every 0.1 s: each resets uvicorn's keep-alive timer
            try:
                conn.sock.sendall(b"x")
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - start > 1.5:
                closed = conn.closed_by_server(1.5)
                break
        assert closed, "a connection without complete headers was held past --header_timeout_s"
        assert time.monotonic() - start < 4
    finally:
        conn.close()


def test_many_slow_header_clients_do_not_block_an_ordinary_one(server):
    url, _ = server
    slow = [RawConnection(url) for _ in range(32)]
    try:
        for conn in slow:
            conn.sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        time.sleep(1.5)
        assert all(conn.closed_by_server(2) for conn in slow)
    finally:
        for conn in slow:
            conn.close()


# --- hosts, identity -----------------------------------------------------------------------------
def test_host_header_allow_list(server):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    for host, ok in [(f"127.0.0.1:{port}", True), (f"localhost:{port}", True), ("localhost", True),
                     ("evil.example", False), (f"rebind.example:{port}", False), ("", False)]:
        r = httpx.get(f"{url}/healthz", headers={"host": host}, timeout=10)
        assert (r.status_code == 200) == ok, (host, r.text)
        if not ok:
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_host"
    app = create_app(FakeCaptioner(), config(allowed_hosts=("*.example.org",)))
    with background_server(app) as other:
        assert httpx.get(f"{other}/healthz", headers={"host": "captions.example.org"}).status_code == 200
        assert httpx.get(f"{other}/healthz").status_code == 400  # 127.0.0.1 is not in the list now


def test_default_hosts_follow_the_bound_address():
    assert set(config().hosts()) == {"127.0.0.1", "localhost", "::1"}
    assert config(host="0.0.0.0").hosts() == ("*",)
    assert set(config(host="10.1.2.3").hosts()) == {"10.1.2.3", "localhost"}


def test_no_absolute_path_in_any_answer(tmp_path):
    model_dir = tmp_path / "secret_dir" / "my_captioner"
    app = create_app(FakeCaptioner(), config(model=str(model_dir)))
    with background_server(app) as url:
        texts = [httpx.get(f"{url}{path}").text for path in ("/", "/healthz", "/v1/model")]
        texts.append(httpx.post(f"{url}/v1/captions", json={"images": [B64]}).text)
    assert all("secret_dir" not in t and str(tmp_path) not in t for t in texts)
    assert json.loads(texts[2])["model"] == "my_captioner" and json.loads(texts[3])["model"] == "my_captioner"


# --- the command -----------------------------------------------------------------------------------
BLOCK_EXTRA = "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_serve_help_works_without_the_serve_extra():
    out = run_python(BLOCK_EXTRA + "from prefixcap.cli import main; sys.exit(main(['serve', '--help']))")
    assert out.returncode == 0, out.stderr
    assert "usage: prefixcap serve" in out.stdout and "--graceful_shutdown_s" in out.stdout
    assert "Traceback" not in out.stderr


def test_serve_without_the_extra_says_what_to_install_in_one_line():
    out = run_python(BLOCK_EXTRA + "from prefixcap.cli import main; sys.exit(main(['serve', '--model', 'x']))")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "pip install -e '.[serve]'" in out.stderr


def test_port_in_use_is_reported_before_the_model_loads(tmp_path, capsys):
    from prefixcap.serve.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        rc = main(["--model", str(tmp_path / "no_model_here"), "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "no_model_here" not in err
    assert err.strip().count("\n") == 0 and time.monotonic() - start < 5


SERVER_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_serve import FakeCaptioner, config
    from prefixcap.serve.app import create_app
    from prefixcap.serve.http import bind_socket, run_server
    cfg = config(graceful_shutdown_s={grace}, body_timeout_s=600, header_timeout_s=600, log_level="warning")
    sock = bind_socket("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    run_server(create_app(FakeCaptioner(), cfg), cfg, sock)
""")


def test_a_slow_client_cannot_keep_a_terminated_server_alive():
    grace = 1.0
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = SERVER_SCRIPT.format(tests=str(Path(__file__).parent), grace=grace)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    conn = None
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):  # the server listens once uvicorn started
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        conn = RawConnection(url)
        conn.sock.sendall((f"POST /v1/captions HTTP/1.1\r\nhost: {conn.host}\r\n"
                           "content-type: application/json\r\ncontent-length: 100000\r\n\r\n").encode())
        stop = threading.Event()

        def trickle():
            for _ in range(60):  # one byte a second, for longer than the test waits
                if stop.wait(1.0):
                    return
                try:
                    conn.sock.sendall(b" ")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(1.0)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace + 10)
        took = time.monotonic() - start
        stop.set()
        assert took < grace + 5, f"the server took {took:.1f} s to stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if conn is not None:
            conn.close()


def test_the_server_keeps_idle_connections_longer_than_clients_do():
    """A client must drop an idle connection before the server closes it, or a request sent on it as the
    server closes it is reset (with both at 5 s that race is open; suspected behind a rare soak ReadError)."""
    import httpx

    from prefixcap.serve.cli import build_parser, config_from_args

    default = config_from_args(build_parser().parse_args(["--model", "m"])).keep_alive_s
    assert default > httpx.Limits().keepalive_expiry  # httpx: 5 s
    assert default > 15  # aiohttp's connector keeps idle connections 15 s


# --- soak: the real command under mixed hostile load ----------------------------------------------
@pytest.mark.slow
def test_soak_mixed_hostile_traffic_no_5xx_and_memory_returns(tmp_path):
    """20 s of bench/serve_soak.py: concurrency 64, 10 % malformed, thin images and 19 MB bodies."""
    pytest.importorskip("psutil")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench import serve_soak

    figures = serve_soak.soak(seconds=20, concurrency=64, workdir=tmp_path)
    print("\nsoak:", json.dumps(figures))
    assert figures["server_5xx"] == 0, figures["outcomes"]
    assert figures["valid_connection_errors"] == 0 and figures["valid_not_200"] == 0, figures["outcomes"]
    # Malformed requests: 4xx. One ReadError among ~40 was seen once (not reproduced in 3,840 malformed-only
    # requests; likely a keep-alive close racing a reused connection), so allow a few; valid ones: none.
    malformed = figures["outcomes"]["malformed"]
    assert sum(n for s, n in malformed.items() if s.isdigit() and 400 <= int(s) < 500) >= 0.9 * sum(malformed.values())
    assert "big" in figures["outcomes"] and "thin" in figures["outcomes"]  # the heavy kinds were sent
    assert figures["rss_peak_growth_mb"] < 500, figures
    assert figures["rss_after_growth_mb"] < 100, figures
