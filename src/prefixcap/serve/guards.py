"""ASGI guards in front of the captioning app: Host allow-list, body size, bytes in flight, body deadline.

Pure ASGI (no FastAPI), so each guard answers before any route runs. Every refusal is the
service's JSON error shape `{"error": {"code", "status", "message"}}`. A route that answers before
it read a body within --max_upload_mb (a 415, a 400) has the rest of the body read first, so the
client sees the answer; a refusal sent before the body was read to its end (413, 503, a refused
Host) carries `Connection: close`: the rest of the body would otherwise still be read (and
thrown away) by the server, or be parsed as the next request on a keep-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

# How long a request waits for room in the in-flight body budget before a 503.
BUDGET_WAIT_S = 2.0
_CLOSE = (b"connection", b"close")


class ApiError(Exception):
    """A whole-request error: an HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "status": status, "message": message}}).encode()


async def send_error(send: Callable, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                     close: bool = True) -> None:
    """Answer with the JSON error shape straight through ASGI (before any route ran)."""
    body = error_body(status, code, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append(_CLOSE)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


# --- Host allow-list -----------------------------------------------------------------------------
def host_of(header: str) -> str:
    """The host part of a Host header, lower-cased: 'Example.org:80' -> 'example.org', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """Starlette TrustedHostMiddleware's rule: an exact name, '*.domain' for subdomains, or '*' for any."""
    return any(p == "*" or host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


class HostGuard:
    """Refuse requests whose Host header names none of `allowed` (DNS rebinding: a web page on
    evil.example whose name resolves to 127.0.0.1 must not reach a loopback-only service)."""

    def __init__(self, app: Any, allowed: tuple[str, ...]):
        self.app = app
        self.allowed = tuple(p.lower() for p in allowed)
        self.allow_any = "*" in self.allowed

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.allow_any:
            await self.app(scope, receive, send)
            return
        raw = _header(scope, b"host")
        host = host_of(raw.decode("latin-1")) if raw else ""
        if host_allowed(host, self.allowed):
            await self.app(scope, receive, send)
            return
        await send_error(send, 400, "bad_host",
                         f"Host {host or '(none)'!r} is not served here; allowed: {', '.join(self.allowed)} "
                         "(--allowed_hosts)")


# --- bytes of request bodies in flight -------------------------------------------------------------
class BodyBudget:
    """Total bytes of request bodies being handled at once; a request reserves its body's size
    before reading it and gives it back when it has been answered.

    Loop-agnostic on purpose (a counter polled with short sleeps): the same app may be served by
    several event loops over its life (tests, background servers), and a reservation is held for
    milliseconds to seconds, so a 10 ms poll costs nothing that matters.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.refused = 0

    async def reserve(self, nbytes: int, wait_s: float = BUDGET_WAIT_S) -> bool:
        nbytes = min(nbytes, self.capacity)  # a single body never exceeds the budget (config check)
        deadline = time.monotonic() + wait_s
        while self.used + nbytes > self.capacity:
            if time.monotonic() >= deadline:
                self.refused += 1
                return False
            await asyncio.sleep(0.01)
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def release(self, nbytes: int) -> None:
        self.used -= min(nbytes, self.capacity)


class BodyGuard:
    """Per request: refuse bodies over `max_bytes` (413), wait for room in the in-flight budget
    (else 503 + Retry-After), give the whole body `body_timeout_s` to arrive (else 408), and add
    `Connection: close` to any answer sent before the body was read to its end or with a 5xx.

    `on_done(nbytes)` is called after each request with the bytes it reserved (the app uses it to
    hand freed memory back to the OS after large bodies).
    """

    def __init__(self, app: Any, max_bytes: int, budget: BodyBudget, body_timeout_s: float,
                 on_done: Callable[[int], None] | None = None):
        self.app, self.max_bytes, self.budget = app, max_bytes, budget
        self.body_timeout_s, self.on_done = body_timeout_s, on_done

    def _too_large(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes (--max_upload_mb)"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_length = _header(scope, b"content-length")
        chunked = b"chunked" in (_header(scope, b"transfer-encoding") or b"").lower()
        length = int(raw_length) if raw_length is not None and raw_length.isdigit() else None
        if length is not None and length > self.max_bytes:
            await send_error(send, 413, "too_large", self._too_large())
            return
        reserve = self.max_bytes if chunked else (length or 0)  # chunked: the most it may become
        if reserve and not await self.budget.reserve(reserve):
            await send_error(send, 503, "busy", "too many large request bodies in flight on this server "
                                                "(--max_inflight_mb); retry later", {"Retry-After": "1"})
            return
        try:
            await self._guarded(scope, receive, send, has_body=chunked or bool(length))
        finally:
            self.budget.release(reserve)
            if self.on_done is not None and reserve:
                self.on_done(reserve)

    async def _guarded(self, scope: dict, receive: Callable, send: Callable, has_body: bool) -> None:
        state = {"body_done": not has_body, "received": 0, "started": False, "refused": False}
        deadline = time.monotonic() + self.body_timeout_s

        async def guarded_receive() -> dict:
            if state["body_done"]:
                return await receive()  # after the body: only http.disconnect comes
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                state["refused"] = True
                raise ApiError(408, "body_timeout", f"the request body did not arrive within {self.body_timeout_s:g} s "
                                                    "(--body_timeout_s)") from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:  # chunked uploads announce no length
                    state["refused"] = True
                    raise ApiError(413, "too_large", self._too_large())
                state["body_done"] = not message.get("more_body", False)
            else:
                state["body_done"] = True  # the client went away
            return message

        async def guarded_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                # An answer before the body's end (a 415, a 400): the body is within the limit, so read
                # it first; a client still sending would otherwise lose the answer to a reset. Not after
                # this guard refused the body (413 / 408): that answer closes the connection at once.
                with contextlib.suppress(ApiError):  # too slow or too long after all: close instead
                    while not state["body_done"] and not state["refused"]:
                        await guarded_receive()
                headers = list(message.get("headers", []))
                if (not state["body_done"] or message["status"] >= 500) and _CLOSE not in headers:
                    message = {**message, "headers": headers + [_CLOSE]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ApiError as err:  # raised from receive where no route handler saw it
            if state["started"]:
                raise
            await send_error(send, err.status, err.code, err.message, err.headers)


# --- requests in progress, and the end of a graceful shutdown ---------------------------------------
class RequestLimit:
    """At most `max_requests` requests in progress (--max_connections); beyond it a JSON 503 `busy`
    with Retry-After. Idle keep-alive connections hold no request, so they do not count (the
    protocol closes the oldest idle one when the open connections pass the limit, serve.http).

    Also the answer to a request still running when --graceful_shutdown_s runs out: uvicorn then
    cancels its task, and instead of its plain-text 500 the client gets the JSON 503 `shutting_down`.
    """

    def __init__(self, app: Any, max_requests: int | None):
        self.app, self.max_requests = app, max_requests
        self.in_progress = 0
        self.refused = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.max_requests is not None and self.in_progress >= self.max_requests:
            self.refused += 1
            await send_error(send, 503, "busy", f"this server is handling {self.in_progress} requests, its limit "
                                                "(--max_connections); retry later", {"Retry-After": "1"})
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.in_progress += 1
        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if started:
                raise
            # uvicorn cancels what still runs when --graceful_shutdown_s is over; answer it properly
            await send_error(send, 503, "shutting_down", "the server is shutting down and this request did not "
                                                         "finish in time (--graceful_shutdown_s); retry it",
                             {"Retry-After": "5"})
        finally:
            self.in_progress -= 1
