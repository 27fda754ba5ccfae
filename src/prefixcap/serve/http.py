"""Running the service on uvicorn with bounded connections: limits, timeouts, a header deadline.

uvicorn's own settings cover most of it: `timeout_keep_alive` (idle time between requests),
`timeout_graceful_shutdown` and `h11_max_incomplete_event_size` (the size of a request's
headers). What uvicorn lacks is a
deadline for *receiving* a request: its keep-alive timer is reset by every byte, so a client
sending one header byte per second holds a connection forever. `DeadlineH11Protocol` adds that
deadline; the body's own deadline is an ASGI guard (serve.guards.BodyGuard, 408). --max_connections
bounds the requests in progress (serve.guards.RequestLimit); past that many open connections,
the protocol closes an idle kept-alive one for each new one (uvicorn's keep-alive expiry, early).

It also closes connections *lingering*: an answer sent before the request body has arrived (413,
503, 408, a refused Host) is followed by a FIN, and the rest of the body is read and dropped for
at most LINGER_S / LINGER_BYTES before the socket is closed. Closing at once, with body bytes
unread, makes the kernel send a reset, and the client usually loses the answer with it: it sees a
connection error instead of the 413 or 503 that would tell it what to do (RFC 9112, 9.6).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from prefixcap.serve.config import ServeConfig

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024  # request line + headers; h11 answers 400 above it
LINGER_S = 2.0  # after an early answer: how long the rest of a body is read and dropped
LINGER_BYTES = 1024 * 1024  # ... and how much of it, at most (a 100 MB upload is not read to its end)


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: `close()` lingers while the client is still
    sending a request body (see the module docstring); everything else is the real transport."""

    def __init__(self, transport: Any, protocol: DeadlineH11Protocol):
        self._real, self._protocol = transport, protocol
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def is_closing(self) -> bool:
        return self.lingering or self._real.is_closing()

    def close(self) -> None:
        if self.lingering or self._real.is_closing():
            return
        if self._protocol.conn.their_state is not h11.SEND_BODY:
            self._real.close()
            return
        self.lingering = True
        self._protocol.dropped = 0
        self._real.write_eof()  # the answer is flushed first, then a FIN
        self._real.resume_reading()
        self._protocol.loop.call_later(LINGER_S, self._real.close)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection must deliver a request's complete headers within
    `header_timeout_s` of its first byte (of connecting, for the first request) or it is closed.
    Unlike the keep-alive timer, the deadline is not pushed back by data."""

    header_timeout_s: float = 10.0
    max_connections: int | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._header_timer: Any = None
        super().connection_made(transport)
        self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
        self._arm()
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._close_an_idle_connection()

    def _close_an_idle_connection(self) -> None:
        """Make room: close one kept-alive connection that waits for a next request (uvicorn's own
        keep-alive expiry, early). Its client reconnects when it has a request; one in progress is kept."""
        for other in list(self.connections):
            # A kept-alive connection between requests is exactly one whose keep-alive timer runs.
            if other is not self and getattr(other, "timeout_keep_alive_task", None) is not None:
                other._unset_keepalive_if_required()
                other.timeout_keep_alive_handler()
                return

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # type: ignore[attr-defined]
            self.dropped += len(data)
            if self.dropped > LINGER_BYTES:
                self.transport._real.close()  # type: ignore[attr-defined]
            return
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # headers complete (or the connection is done)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closing a connection from %s: no complete request headers within %g s (--header_timeout_s)",
                        self.client, self.header_timeout_s)
            self.transport.close()


def protocol_class(header_timeout_s: float, max_connections: int | None = None) -> type[DeadlineH11Protocol]:
    """A DeadlineH11Protocol with this deadline and room (uvicorn instantiates the class itself)."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})


def uvicorn_config(app: Any, config: ServeConfig, **overrides: Any) -> uvicorn.Config:
    """The uvicorn settings of `prefixcap serve`: one place, so tests serve exactly what users get."""
    settings: dict[str, Any] = dict(
        host=config.host, port=config.port, log_level=config.log_level,
        http=protocol_class(config.header_timeout_s, config.max_connections), ws="none", lifespan="on",
        # --max_connections is enforced by serve.guards.RequestLimit (requests in progress, a JSON 503
        # with Retry-After), not by uvicorn's limit_concurrency: that counts idle keep-alive connections
        # too, so 200 connections at once with a limit of 150 were all refused, in plain text.
        limit_concurrency=None, timeout_keep_alive=config.keep_alive_s,
        timeout_graceful_shutdown=config.graceful_shutdown_s, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening), so that a port in use is reported before
    the model is loaded; OSError when it cannot be bound."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_server(app: Any, config: ServeConfig, sock: socket.socket) -> None:
    """Serve `app` on the already bound `sock` until SIGINT/SIGTERM (then at most
    --graceful_shutdown_s for requests in progress)."""
    uvicorn.Server(uvicorn_config(app, config)).run(sockets=[sock])


@contextlib.contextmanager
def background_server(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                      **uvicorn_kwargs: Any) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread; yields the base URL (port 0 = a free port). For tests/demos.

    Uses the app's ServeConfig (connection limits, deadlines) unless `uvicorn_kwargs` override them.
    """
    from prefixcap.serve.config import ServeConfig

    config = getattr(getattr(app, "state", None), "config", None) or ServeConfig()
    # Longer than the 5 s default: a client reusing a keep-alive connection at the very moment the
    # server closes it gets "server disconnected", which tests would read as a server failure.
    uvicorn_kwargs.setdefault("timeout_keep_alive", 30)
    server = uvicorn.Server(uvicorn_config(app, config, host=host, port=port, log_level=log_level, **uvicorn_kwargs))
    thread = threading.Thread(target=server.run, name="prefixcap-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
