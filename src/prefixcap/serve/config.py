"""`ServeConfig`: everything `prefixcap serve` is configured with (importable without the serve extra)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefixcap.serve.batching import BatchConfig
from prefixcap.generation import expectation, field_problem

# Formats PIL may open for an upload. Deliberately short: PIL can also open EPS (which runs
# Ghostscript) and many rare formats; a web service has no reason to expose those decoders.
SAFE_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass
class ServeConfig:
    """Everything `prefixcap serve` is configured with; /v1/model reports the limits."""

    model: str = ""
    datastore: str | None = None  # a retrieval model's datastore (None: the one it was trained with)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    quantize: str | None = None  # "int8": the LM's linear layers in int8 (CPU only; model/quantize.py)
    batch: BatchConfig = field(default_factory=BatchConfig)
    max_upload_bytes: int = 20 * 1024 * 1024  # whole request body
    max_image_pixels: int = 25_000_000  # per image, checked from the header before decoding
    max_images_per_request: int = 16
    # Per-server caps on decoding options: policy on top of GenerationSettings.validate()'s bounds.
    max_num_beams: int = 5
    max_new_tokens_limit: int = 100
    default_max_new_tokens: int | None = None  # None: the model's trained caption length (capped)
    max_return_sequences: int = 5
    max_temperature: float = 5.0
    decode_threads: int = 4  # images decoded at once (each may hold max_image_pixels RGB pixels)
    allow_urls: bool = False
    url_timeout_s: float = 10.0
    image_formats: tuple[str, ...] = SAFE_IMAGE_FORMATS
    warmup: bool = True  # caption one blank image at startup: loads CLIP, first request is not slow
    log_level: str = "info"
    # --- connections and hostile clients (see docs/serve.md, "Connections") ---------------------
    # Bodies of requests being handled at once: each one's bytes are reserved before it is read.
    # Peak memory is a small multiple of it (JSON text + decoded base64 + the decoded images).
    max_inflight_bytes: int = 100 * 1024 * 1024
    max_connections: int | None = 512  # requests in progress (serve.guards.RequestLimit); beyond it JSON 503
    # Idle time between requests on a kept-alive connection. Longer than common clients' own idle expiry
    # (httpx 5 s, aiohttp 15 s) so that the client drops an idle connection first: with equal timeouts
    # (uvicorn's 5 s against httpx's) the server can close one just as the client reuses it, and that
    # request fails with a connection reset. (Suspected, not shown, behind the soak test's rare
    # valid-request ReadError.) Idle connections cost no request slot, and past the connection limit the
    # oldest idle one is closed for each new client (serve/http.py): a longer timeout cannot exhaust the server.
    keep_alive_s: float = 20.0
    header_timeout_s: float = 10.0  # a request's headers must be complete this long after its first byte
    body_timeout_s: float = 60.0  # the whole body must have arrived this long after the headers (else 408)
    graceful_shutdown_s: float = 10.0  # after SIGTERM, requests in progress get this long to finish
    # Host header names served (DNS rebinding guard); None = the bound host and localhost.
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name, (cap, flag) in self.option_caps().items():
            if field_problem(name, cap) is not None:
                raise ValueError(f"{flag} {cap!r} must be {expectation(name)} (the bound every caller gets)")
        default = self.default_max_new_tokens
        if default is not None and (isinstance(default, bool) or not isinstance(default, int)
                                    or not 1 <= default <= self.max_new_tokens_limit):
            raise ValueError(f"--default_max_new_tokens {default!r} must be an integer in "
                             f"[1, {self.max_new_tokens_limit}] (--max_new_tokens_limit)")
        self._check_connection_settings()
        if self.quantize is not None:
            from prefixcap.model.quantize import check_quantize

            check_quantize(self.quantize, self.device)  # QuantizeError is a ValueError: one line, exit 2

    def _check_connection_settings(self) -> None:
        positive = {"--header_timeout_s": self.header_timeout_s, "--body_timeout_s": self.body_timeout_s,
                    "--keep_alive_s": self.keep_alive_s, "--max_upload_mb": self.max_upload_bytes}
        for flag, value in positive.items():
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if self.graceful_shutdown_s < 0:
            raise ValueError(f"--graceful_shutdown_s must be >= 0, got {self.graceful_shutdown_s}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"--max_connections must be >= 1, got {self.max_connections}")
        if self.max_inflight_bytes < self.max_upload_bytes:
            raise ValueError(f"--max_inflight_mb ({self.max_inflight_bytes / 2**20:g}) must be at least "
                             f"--max_upload_mb ({self.max_upload_bytes / 2**20:g}): one full body must fit")

    def option_caps(self) -> dict[str, tuple[int | float, str]]:
        """Decoding field -> (this server's largest accepted value, the flag that sets it)."""
        return {"num_beams": (self.max_num_beams, "--max_num_beams"),
                "max_new_tokens": (self.max_new_tokens_limit, "--max_new_tokens_limit"),
                "num_return_sequences": (self.max_return_sequences, "--max_return_sequences"),
                "temperature": (self.max_temperature, "--max_temperature")}

    def hosts(self) -> tuple[str, ...]:
        """The Host header names served: --allowed_hosts, else the bound host and localhost
        (any name when bound to every interface: then only the operator knows the public names)."""
        if self.allowed_hosts is not None:
            return tuple(self.allowed_hosts)
        if self.host in WILDCARD_HOSTS:
            return ("*",)
        names = [self.host.strip("[]"), "localhost"]
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(self.host.strip("[]")).is_loopback:
                names += ["127.0.0.1", "::1"]
        return tuple(dict.fromkeys(names))

    def limits(self) -> dict[str, Any]:
        return {
            "quantize": self.quantize,  # GET /v1/model shows whether the LM runs in int8
            "max_upload_bytes": self.max_upload_bytes,
            "max_inflight_bytes": self.max_inflight_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_images_per_request": self.max_images_per_request,
            "max_num_beams": self.max_num_beams,
            "max_new_tokens": self.max_new_tokens_limit,
            "max_return_sequences": self.max_return_sequences,
            "max_temperature": self.max_temperature,
            "allow_urls": self.allow_urls,
            "image_formats": list(self.image_formats),
            "max_connections": self.max_connections,
            "header_timeout_s": self.header_timeout_s,
            "body_timeout_s": self.body_timeout_s,
            **{k: v for k, v in asdict(self.batch).items()},
        }


def public_name(source: str | None) -> str | None:
    """A model or encoder as a client may see it: a local path becomes its folder's name, a Hub id
    ('openai/clip-vit-base-patch32') stays. Absolute paths reveal the server's file layout."""
    if not source:
        return source
    text = str(source)
    looks_local = os.path.isabs(text) or text.startswith(("~", ".")) or os.path.exists(text) or "\\" in text
    return Path(text.rstrip("/\\")).name or text if looks_local else text


def redact_paths(value: Any) -> Any:
    """`value` (nested dicts/lists from a model config) with every local path replaced by its name."""
    if isinstance(value, dict):
        return {k: redact_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_paths(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return public_name(value)
    return value
