"""HTTP captioning service: FastAPI app (captions, health, model info, web page) and `prefixcap serve`.

Every bad input is answered with a 4xx and a message naming the image and the limit; an image
that fails never fails the other images of its request. Memory is bounded by construction:
request bodies by --max_upload_mb, decoded images by --max_image_pixels times the few decoding
threads, and queued work by --max_queue preprocessed images (a few hundred KB each).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import json
import logging
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Callable, Iterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixcap import __version__
from prefixcap.batching import (BatchConfig, BatcherClosed, Captioner, DecodeOptions, DynamicBatcher,
                                QueueFull, RequestTimeout)
from prefixcap.encoders import to_rgb

logger = logging.getLogger(__name__)

# Formats PIL may open for an upload. Deliberately short: PIL can also open EPS (which runs
# Ghostscript) and many rare formats; a web service has no reason to expose those decoders.
SAFE_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass
class ServeConfig:
    """Everything `prefixcap serve` is configured with; /v1/model reports the limits."""

    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    batch: BatchConfig = field(default_factory=BatchConfig)
    max_upload_bytes: int = 20 * 1024 * 1024  # whole request body
    max_image_pixels: int = 25_000_000  # per image, checked from the header before decoding
    max_images_per_request: int = 16
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

    def limits(self) -> dict[str, Any]:
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_images_per_request": self.max_images_per_request,
            "max_num_beams": self.max_num_beams,
            "max_new_tokens": self.max_new_tokens_limit,
            "max_return_sequences": self.max_return_sequences,
            "max_temperature": self.max_temperature,
            "allow_urls": self.allow_urls,
            "image_formats": list(self.image_formats),
            **{k: v for k, v in asdict(self.batch).items()},
        }


# --- request / response schemas (documented in the OpenAPI schema) ----------------------------
class CaptionOptions(BaseModel):
    """Decoding options; unset ones take the server's defaults. Limits: GET /v1/model."""

    model_config = ConfigDict(extra="forbid")

    num_beams: int | None = Field(None, description="1 = greedy; >1 = beam search")
    max_new_tokens: int | None = Field(None, description="longest caption in tokens")
    do_sample: bool | None = Field(None, description="sample instead of greedy/beam search")
    temperature: float | None = Field(None, description="sampling temperature (> 0)")
    top_k: int | None = Field(None, description="sampling: keep the k most likely tokens (0 = all)")
    top_p: float | None = Field(None, description="sampling: nucleus probability mass in (0, 1]")
    num_return_sequences: int | None = Field(None, description="captions per image")


class ImageSource(BaseModel):
    """One image of a JSON request: base64 bytes (a data: URL works too) or, if enabled, a URL."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(None, description="base64-encoded image file, optionally as a data: URL")
    url: str | None = Field(None, description="http(s) URL; only when the server runs with --allow_urls")
    name: str | None = Field(None, description="echoed back in the result")


class CaptionJSONRequest(CaptionOptions):
    """JSON body of POST /v1/captions: images as base64 strings or ImageSource objects."""

    images: list[str | ImageSource] = Field(..., description="base64 strings or {data|url, name} objects")


class ImageErrorBody(BaseModel):
    code: str
    status: int
    message: str


class ImageResult(BaseModel):
    index: int
    name: str | None = None
    caption: str | None = Field(None, description="the first (best) caption")
    captions: list[str] | None = Field(None, description="all captions (num_return_sequences)")
    error: ImageErrorBody | None = None


class CaptionResponse(BaseModel):
    model: str
    options: dict[str, Any]
    results: list[ImageResult]
    elapsed_ms: float


class ErrorResponse(BaseModel):
    error: ImageErrorBody


# --- errors --------------------------------------------------------------------------------
class ApiError(Exception):
    """A whole-request error: an HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class ImageError(Exception):
    """One image's error; reported in its result while the other images are captioned."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "status": self.status, "message": self.message}


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "status": status, "message": message}}, status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` (413): by Content-Length up front, else while streaming."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                   "(--max_upload_mb)")
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    await _error_response(413, "too_large", message)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:  # chunked uploads announce no length
                    raise _BodyTooLarge(message)
            return msg

        await self.app(scope, limited_receive, send)


# --- image decoding --------------------------------------------------------------------------
def decode_upload(data: bytes, name: str, max_pixels: int,
                  formats: tuple[str, ...] = SAFE_IMAGE_FORMATS) -> Image.Image:
    """Encoded bytes -> RGB PIL image, or ImageError naming the image and what is wrong with it.

    Thread-safe (runs in several threads at once), so it neither swaps PIL's global
    MAX_IMAGE_PIXELS nor installs warning filters: the pixel count is checked explicitly from
    the header, before any pixel is decoded; PIL's own bomb check (`main` sets its limit to the
    same value) is a second line of defence whose exception is caught here too.
    """
    if not data:
        raise ImageError(422, "empty_file", f"{name}: the file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(413, "too_many_pixels",
                             f"{name}: {width}x{height} = {width * height} pixels is more than this server's "
                             f"limit of {max_pixels} (--max_image_pixels; refused as a possible decompression bomb)")
        if getattr(image, "is_animated", False):
            image.seek(0)  # first frame
        image.load()
        rgb = to_rgb(image)
        rgb.load()
        return rgb
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(413, "too_many_pixels", f"{name}: refused as a decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise ImageError(415, "not_an_image",
                         f"{name}: not an image (or not one of the accepted formats: {', '.join(formats)})") from None
    except OSError as err:
        code = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
        raise ImageError(422, code, f"{name}: the image data cannot be decoded: {err}") from None
    except Exception as err:  # noqa: BLE001 - PIL plugins raise many types (SyntaxError, struct.error...)
        raise ImageError(422, "corrupt_image", f"{name}: the image data cannot be decoded: "
                                               f"{type(err).__name__}: {err}") from None


def _b64decode(text: str, name: str) -> bytes:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise ImageError(422, "bad_base64", f"{name}: a data: URL must be base64 ('data:image/png;base64,...')")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(422, "bad_base64", f"{name}: invalid base64 image data: {err}") from None


# --- options -----------------------------------------------------------------------------------
def resolve_options(given: CaptionOptions, config: ServeConfig, default_max_new_tokens: int) -> DecodeOptions:
    """Client options + server defaults -> DecodeOptions, or ApiError(422) naming option and limit."""
    base = DecodeOptions(max_new_tokens=default_max_new_tokens)
    values = {k: v for k, v in given.model_dump().items() if v is not None}
    opts = DecodeOptions(**{**asdict(base), **values})
    problems = []

    def check(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    check(1 <= opts.num_beams <= config.max_num_beams,
          f"num_beams={opts.num_beams} must be between 1 and {config.max_num_beams} (--max_num_beams)")
    check(1 <= opts.max_new_tokens <= config.max_new_tokens_limit,
          f"max_new_tokens={opts.max_new_tokens} must be between 1 and {config.max_new_tokens_limit} "
          "(--max_new_tokens_limit)")
    check(1 <= opts.num_return_sequences <= config.max_return_sequences,
          f"num_return_sequences={opts.num_return_sequences} must be between 1 and "
          f"{config.max_return_sequences} (--max_return_sequences)")
    check(0 < opts.temperature <= config.max_temperature,
          f"temperature={opts.temperature} must be in (0, {config.max_temperature}]")
    check(0 <= opts.top_k <= 10_000, f"top_k={opts.top_k} must be between 0 and 10000")
    check(0 < opts.top_p <= 1, f"top_p={opts.top_p} must be in (0, 1]")
    check(opts.do_sample or opts.num_return_sequences <= opts.num_beams,
          f"num_return_sequences={opts.num_return_sequences} needs num_beams >= {opts.num_return_sequences} "
          "or do_sample=true (greedy/beam search returns at most one caption per beam)")
    if problems:
        raise ApiError(422, "bad_option", "; ".join(problems))
    return opts


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "body"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field {where!r} (options: {', '.join(CaptionOptions.model_fields)})")
        else:
            parts.append(f"{where}: {e['msg']} (got {e.get('input')!r:.60})")
    return "; ".join(parts)


# --- the app -----------------------------------------------------------------------------------
@dataclass
class _Input:
    """One image of a request before decoding."""

    name: str
    data: bytes | None = None
    url: str | None = None
    error: ImageError | None = None


def _page() -> str:
    return resources.files("prefixcap").joinpath("static/index.html").read_text(encoding="utf-8")


def describe_model(captioner: Any, config: ServeConfig) -> dict[str, Any]:
    """What is loaded, for GET /v1/model: artifact config, encoder, LM and the server's settings."""
    cfg = getattr(captioner, "config", None)
    artifact = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    mapping = artifact.get("mapping", {})
    encoder: dict[str, Any] = {"name": getattr(captioner, "clip_model", artifact.get("clip_model")),
                               "embedding_dim": mapping.get("prefix_size")}
    with contextlib.suppress(Exception):  # encoder loaded by the warm-up; a fake captioner has none
        enc = captioner.encoder
        encoder.update(backend=enc.spec.backend, source=enc.spec.name, embedding_dim=enc.embedding_dim)
    return {
        "model": config.model or type(captioner).__name__,
        "prefixcap_version": __version__,
        "encoder": encoder,
        "language_model": {"name": artifact.get("language_model"), "family": artifact.get("lm_family")},
        "mapping": mapping,
        "prefix_length": mapping.get("prefix_length"),
        "normalize_prefix": artifact.get("normalize_prefix"),
        "device": str(getattr(captioner, "device", config.device)),
        "artifact": artifact,
        "limits": config.limits(),
    }


def _default_max_new_tokens(captioner: Any, config: ServeConfig) -> int:
    if config.default_max_new_tokens is not None:
        return config.default_max_new_tokens
    trained = getattr(getattr(captioner, "config", None), "max_token_length", None)
    return min(int(trained), config.max_new_tokens_limit) if trained else min(30, config.max_new_tokens_limit)


def create_app(captioner: Captioner, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app around any object with `caption(images, **options)`; tests pass a fake one.

    If the captioner also has `preprocess(image) -> pixels` (prefixcap's Captioner does), images
    are preprocessed in the request's thread, so the model thread only runs the networks and a
    queued image holds a small pixel array instead of a full-size picture.
    """
    config = config or ServeConfig()
    batcher = DynamicBatcher(captioner, config.batch)
    preprocess = getattr(captioner, "preprocess", None)
    decode_limiter = anyio.CapacityLimiter(config.decode_threads)
    default_new_tokens = _default_max_new_tokens(captioner, config)
    info: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.warmup:
            blank = Image.new("RGB", (64, 64), (127, 127, 127))
            await anyio.to_thread.run_sync(
                lambda: captioner.caption([preprocess(blank) if preprocess else blank], batch_size=1,
                                          max_new_tokens=2))
        info.update(describe_model(captioner, config))
        info["limits"]["default_max_new_tokens"] = default_new_tokens
        await batcher.start()
        app.state.started = time.time()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="prefixcap", version=__version__, lifespan=lifespan,
                  description="ClipCap-style image captioning: upload images, get captions. "
                              "Concurrent requests are batched on the model.")
    app.state.batcher = batcher
    app.state.config = config
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_upload_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return _error_response(413, "too_large", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(_page())

    @app.get("/healthz", summary="liveness and batching counters")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": config.model or type(captioner).__name__,
                "uptime_s": round(time.time() - getattr(app.state, "started", time.time()), 3),
                "batcher": batcher.stats.as_dict()}

    @app.get("/v1/model", summary="the loaded model, encoder, language model and server limits")
    async def model_info() -> dict[str, Any]:
        return info

    caption_body_doc = {
        "requestBody": {
            "required": True,
            "description": "multipart/form-data: image files (any field name) plus option fields; "
                           "or application/json: CaptionJSONRequest.",
            "content": {
                "multipart/form-data": {"schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        **CaptionOptions.model_json_schema()["properties"],
                    },
                    "required": ["images"],
                }},
                "application/json": {"schema": {"$ref": "#/components/schemas/CaptionJSONRequest"}},
            },
        }
    }
    error_doc = {"model": ErrorResponse}

    @app.post(
        "/v1/captions", response_model=CaptionResponse, summary="caption one or more images",
        openapi_extra=caption_body_doc,
        responses={400: error_doc, 413: error_doc, 415: error_doc, 422: error_doc,
                   503: {"model": ErrorResponse, "description": "queue full or timed out; see Retry-After"}},
    )
    async def captions(request: Request) -> JSONResponse:
        start = time.perf_counter()
        inputs, given = await _read_request(request)
        options = resolve_options(given, config, default_new_tokens)
        prepared = await asyncio.gather(*(_prepare(item) for item in inputs))
        ok = [i for i, p in enumerate(prepared) if not isinstance(p, ImageError)]
        outputs: list[Any] = []
        if ok:
            try:
                outputs = await batcher.submit([prepared[i] for i in ok], options)
            except (QueueFull, RequestTimeout) as exc:
                code = "queue_full" if isinstance(exc, QueueFull) else "timeout"
                raise ApiError(503, code, str(exc), {"Retry-After": str(exc.retry_after)}) from None
            except BatcherClosed as exc:
                raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "5"}) from None
        results: list[dict[str, Any]] = []
        captions_of = dict(zip(ok, outputs))
        for i, item in enumerate(inputs):
            result: dict[str, Any] = {"index": i, "name": item.name}
            out = captions_of.get(i, prepared[i])
            if isinstance(out, ImageError):
                result["error"] = out.body()
            elif isinstance(out, Exception):
                logger.error("model failed on %s: %r", item.name, out)
                result["error"] = {"code": "model_error", "status": 500,
                                   "message": f"{item.name}: the model failed on this image: {out}"}
            else:
                result.update(caption=out[0] if out else "", captions=out)
            results.append(result)
        statuses = {r["error"]["status"] for r in results if "error" in r}
        status = 200
        if len(statuses) and all("error" in r for r in results):
            status = statuses.pop() if len(statuses) == 1 else 400  # nothing captioned: say why
        body = {"model": config.model or type(captioner).__name__, "options": asdict(options),
                "results": results, "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}
        return JSONResponse(body, status)

    async def _read_request(request: Request) -> tuple[list[_Input], CaptionOptions]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            inputs, raw = await _read_multipart(request)
        elif ctype == "application/json":
            inputs, raw = await _read_json(request)
        else:
            raise ApiError(415, "unsupported_content_type",
                           f"Content-Type {ctype or '(none)'!r} is not accepted; send multipart/form-data "
                           "(image files + option fields) or application/json (base64 images)")
        if not inputs:
            raise ApiError(400, "no_images", "the request contains no image (multipart: add file fields; "
                                             "JSON: a non-empty 'images' list)")
        _check_image_count(len(inputs))
        try:
            return inputs, CaptionOptions.model_validate(raw)
        except ValidationError as err:
            raise ApiError(422, "bad_option", _validation_message(err)) from None

    def _check_image_count(count: int) -> None:
        if count > config.max_images_per_request:
            raise ApiError(413, "too_many_images",
                           f"{count} images in one request; this server accepts at most "
                           f"{config.max_images_per_request} (--max_images_per_request)")

    async def _read_multipart(request: Request) -> tuple[list[_Input], dict[str, Any]]:
        inputs: list[_Input] = []
        raw: dict[str, Any] = {}
        # Files spool to disk past 1 MB and the body limit bounds them all; the image count is
        # checked by the caller so that it gets this server's message.
        async with request.form(max_fields=64, max_part_size=64 * 1024) as form:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    if key not in CaptionOptions.model_fields and key in ("images", "image", "file", "files"):
                        raise ApiError(422, "bad_request", f"form field {key!r} is text, not a file: send the "
                                                           f"image as a file part (curl -F {key}=@photo.jpg)")
                    raw[key] = value
                else:
                    name = value.filename or f"{key}[{len(inputs)}]"
                    inputs.append(_Input(name=name, data=await value.read()))
        return inputs, raw

    async def _read_json(request: Request) -> tuple[list[_Input], dict[str, Any]]:
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, "bad_json", f"the body is not valid JSON: {err}") from None
        if not isinstance(payload, dict):
            raise ApiError(422, "bad_request", "the JSON body must be an object with an 'images' list")
        images = payload.pop("images", None)
        if not isinstance(images, list):
            raise ApiError(422, "bad_request", "the JSON body needs 'images': a list of base64 strings or "
                                               "{\"data\": base64, \"name\": ...} / {\"url\": ...} objects")
        _check_image_count(len(images))  # before any base64 is decoded
        inputs = []
        for i, entry in enumerate(images):
            name = f"images[{i}]"
            try:
                if isinstance(entry, str):
                    inputs.append(_Input(name=name, data=_b64decode(entry, name)))
                    continue
                src = ImageSource.model_validate(entry)
                name = src.name or name
                if (src.data is None) == (src.url is None):
                    raise ImageError(422, "bad_image_entry", f"{name}: give exactly one of 'data' or 'url'")
                if src.url is not None:
                    inputs.append(_Input(name=name, url=src.url))
                else:
                    inputs.append(_Input(name=name, data=_b64decode(src.data, name)))
            except ImageError as err:
                inputs.append(_Input(name=name, error=err))
            except ValidationError as err:
                inputs.append(_Input(name=name, error=ImageError(422, "bad_image_entry",
                                                                 f"{name}: {_validation_message(err)}")))
        return inputs, payload

    async def _prepare(item: _Input) -> Any:
        """Fetch (URL), decode and preprocess one image; an ImageError is returned, not raised."""
        try:
            if item.error is not None:
                raise item.error
            data = item.data
            if item.url is not None:
                data = await _fetch(item.url, item.name)

            def work() -> Any:
                image = decode_upload(data, item.name, config.max_image_pixels, config.image_formats)
                if preprocess is None:
                    return image
                try:
                    return preprocess(image)
                except Exception as err:  # noqa: BLE001 - reported for this image only
                    raise ImageError(422, "preprocess_failed", f"{item.name}: cannot preprocess: {err}") from None

            return await anyio.to_thread.run_sync(work, limiter=decode_limiter)
        except ImageError as err:
            return err

    async def _fetch(url: str, name: str) -> bytes:
        if not config.allow_urls:
            raise ImageError(403, "urls_disabled",
                             f"{name}: image URLs are disabled on this server (start it with --allow_urls)")
        if not url.lower().startswith(("http://", "https://")):
            raise ImageError(422, "bad_url", f"{name}: only http(s) URLs are accepted, got {url[:80]!r}")
        import httpx

        try:
            async with httpx.AsyncClient(timeout=config.url_timeout_s, follow_redirects=True) as client, \
                    client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise ImageError(422, "url_fetch_failed", f"{name}: GET {url} answered {resp.status_code}")
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > config.max_upload_bytes:
                        raise ImageError(413, "too_large", f"{name}: {url} is larger than "
                                                           f"{config.max_upload_bytes} bytes (--max_upload_mb)")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as err:
            raise ImageError(422, "url_fetch_failed", f"{name}: cannot fetch {url}: {err}") from None

    def openapi() -> dict[str, Any]:
        # The caption endpoint parses its body itself (multipart or JSON), so FastAPI does not
        # see the JSON model; register it so the documented $ref resolves.
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            body = CaptionJSONRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["CaptionJSONRequest"] = body
        return app.openapi_schema

    app.openapi = openapi
    return app


# --- running it ---------------------------------------------------------------------------------
@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                      log_level: str = "warning", **uvicorn_kwargs: Any) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread; yields the base URL (port 0 = a free port). For tests/demos."""
    import uvicorn

    # Longer than uvicorn's 5 s: a client reusing a keep-alive connection at the very moment the
    # server closes it gets "server disconnected", which tests would read as a server failure.
    uvicorn_kwargs.setdefault("timeout_keep_alive", 30)

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, **uvicorn_kwargs))
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def build_parser() -> argparse.ArgumentParser:
    d, b = ServeConfig(), BatchConfig()
    p = argparse.ArgumentParser(prog="prefixcap serve", description="HTTP captioning service with a web page.")
    p.add_argument("--model", required=True, help="trained prefixcap model: a folder or a Hub repo id")
    p.add_argument("--host", default=d.host, help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, mps ...")
    g = p.add_argument_group("batching")
    g.add_argument("--max_batch_size", type=int, default=b.max_batch_size, help="images per model call")
    g.add_argument("--max_wait_ms", type=float, default=b.max_wait_ms,
                   help="how long a queued image may wait for others to share its batch")
    g.add_argument("--max_queue", type=int, default=b.max_queue,
                   help="images waiting for the model; beyond it requests get 503 + Retry-After")
    g.add_argument("--request_timeout_s", type=float, default=b.request_timeout_s)
    g = p.add_argument_group("limits")
    g.add_argument("--max_upload_mb", type=float, default=d.max_upload_bytes / 2**20, help="request body size")
    g.add_argument("--max_image_pixels", type=int, default=d.max_image_pixels,
                   help="larger images are refused (decompression bombs)")
    g.add_argument("--max_images_per_request", type=int, default=d.max_images_per_request)
    g.add_argument("--max_num_beams", type=int, default=d.max_num_beams)
    g.add_argument("--max_new_tokens_limit", type=int, default=d.max_new_tokens_limit,
                   help="largest max_new_tokens a client may ask for")
    g.add_argument("--default_max_new_tokens", type=int, default=None,
                   help="when the client sets none (default: the model's trained caption length, capped)")
    g.add_argument("--max_return_sequences", type=int, default=d.max_return_sequences)
    g.add_argument("--decode_threads", type=int, default=d.decode_threads, help="images decoded at once")
    g.add_argument("--allow_urls", action="store_true",
                   help="let JSON requests name image URLs the server fetches (off: a public server "
                        "would fetch whatever it is told, including internal addresses)")
    p.add_argument("--log_level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    batch = BatchConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                        max_queue=args.max_queue, request_timeout_s=args.request_timeout_s)
    return ServeConfig(
        model=args.model, host=args.host, port=args.port, device=args.device, batch=batch,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_image_pixels=args.max_image_pixels,
        max_images_per_request=args.max_images_per_request, max_num_beams=args.max_num_beams,
        max_new_tokens_limit=args.max_new_tokens_limit, default_max_new_tokens=args.default_max_new_tokens,
        max_return_sequences=args.max_return_sequences, decode_threads=args.decode_threads,
        allow_urls=args.allow_urls, log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"prefixcap serve: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import uvicorn

    from prefixcap.caption import Captioner as PrefixCaptioner

    try:
        captioner = PrefixCaptioner.from_pretrained(config.model, device=config.device)
    except (OSError, ValueError) as err:
        print(f"prefixcap serve: cannot load model {config.model!r}: {err}", file=sys.stderr)
        return 1
    # PIL's own decompression-bomb check agrees with ours (it raises above twice this value).
    # Its warning between 1x and 2x is redundant: decode_upload refuses those images itself.
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if not _is_loopback(config.host):
        logger.warning("listening on %s: the service has no authentication; put it behind a proxy that has",
                       config.host)
    print(f"prefixcap serve: http://{config.host}:{config.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(create_app(captioner, config), host=config.host, port=config.port, log_level=config.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
