"""HTTP captioning service: the FastAPI app (captions, health, model info, web page).

Every bad input is answered with a 4xx and a message naming the image and the limit; an image
that fails never fails the other images of its request, and a 500 (a bug, never the input) comes
with `Connection: close`. Memory is bounded by construction: request bodies by --max_upload_mb and
together by --max_inflight_mb (serve.guards), decoded images by --max_image_pixels times the few
decoding threads, and queued work by --max_queue preprocessed images (a few hundred KB each).
Running it: serve.http (uvicorn, connection limits and deadlines) and serve.cli (`prefixcap serve`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from typing import Any, Callable

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from prefixcap import __version__
from prefixcap.serve.batching import BatcherClosed, Captioner, DynamicBatcher, QueueFull, RequestTimeout
from prefixcap.data.images import decode_image
from prefixcap.serve.config import SAFE_IMAGE_FORMATS, ServeConfig, public_name, redact_paths
from prefixcap.serve.guards import ApiError, BodyBudget, BodyGuard, HostGuard
from prefixcap.serve.memory import MemoryTrimmer
from prefixcap.generation import (FIELD_NAMES, RANGES, GenerationSettings, GenerationSettingsError, expectation,
                                  field_problem, parse_field)

logger = logging.getLogger(__name__)


# --- request / response schemas (documented in the OpenAPI schema) ----------------------------
def _options_model() -> type[BaseModel]:
    """The request's decoding options, one optional field per GenerationSettings field.

    Types are strict for JSON (`"num_beams": "5"`, `5.0` or `true` is a 422, never coerced; an
    integer is accepted for a float field). Multipart form fields are text, parsed like the CLI
    flags by `form_options` before this model sees them. Ranges are checked by the one
    `GenerationSettings.validate()` (then this server's caps) in `resolve_options`.
    """
    hints = typing.get_type_hints(GenerationSettings)
    options = {f.name: (hints[f.name] | None, Field(None, strict=True,
                                                    description=f"{f.metadata['help']}; {expectation(f.name)}"))
               for f in fields(GenerationSettings)}
    return create_model("CaptionOptions", __config__=ConfigDict(extra="forbid"), __module__=__name__,
                        __doc__="Decoding options; unset ones take the server's defaults. Limits: GET /v1/model.",
                        **options)


CaptionOptions = _options_model()


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
class ImageError(Exception):
    """One image's error; reported in its result while the other images are captioned."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "status": self.status, "message": self.message}


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "status": status, "message": message}}, status, headers=headers)


# --- image decoding --------------------------------------------------------------------------
def decode_upload(data: bytes, name: str, max_pixels: int,
                  formats: tuple[str, ...] = SAFE_IMAGE_FORMATS) -> Image.Image:
    """Encoded bytes -> upright RGB PIL image through the shared decoder, or ImageError naming the image.

    Thread-safe: the pixel limit is checked per call from the header (see data/images.py).
    """
    decoded = decode_image(data, max_pixels, formats=formats)
    if decoded.image is not None:
        return decoded.image
    reason = decoded.reason
    if reason == "empty_file":
        raise ImageError(422, "empty_file", f"{name}: the file is empty")
    if reason == "too_large" and decoded.size and decoded.size[0] * decoded.size[1] > max_pixels:
        width, height = decoded.size
        raise ImageError(413, "too_many_pixels",
                         f"{name}: {width}x{height} = {width * height} pixels is more than this server's "
                         f"limit of {max_pixels} (--max_image_pixels; refused as a possible decompression bomb)")
    if reason == "too_large":  # PIL's own check (its global limit, which `main` sets)
        raise ImageError(413, "too_many_pixels", f"{name}: refused as a decompression bomb: {decoded.detail}")
    if reason == "not_an_image":
        raise ImageError(415, "not_an_image",
                         f"{name}: not an image (or not one of the accepted formats: {', '.join(formats)})")
    code = "truncated_image" if reason == "truncated" else "corrupt_image"
    raise ImageError(422, code, f"{name}: the image data cannot be decoded: {decoded.detail}")


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
def form_options(raw: dict[str, str]) -> dict[str, Any]:
    """Multipart option fields (text) -> typed values, as the CLI parses its flags; ApiError(422) naming
    each field that does not parse. Unknown fields pass through for the schema to name them."""
    values, problems = {}, []
    for key, text in raw.items():
        if key not in FIELD_NAMES:
            values[key] = text
            continue
        try:
            values[key] = parse_field(key, text)
        except ValueError as err:
            problems.append(f"{key}: {err}")
    if problems:
        raise ApiError(422, "bad_option", "; ".join(problems))
    return values


def resolve_options(given: BaseModel, config: ServeConfig, default_max_new_tokens: int) -> GenerationSettings:
    """Client options over the server's defaults -> validated, normalized GenerationSettings, or
    ApiError(422) naming each bad option and its allowed range (this server's cap where it is lower)."""
    server_default = GenerationSettings(max_new_tokens=default_max_new_tokens)
    settings = replace(server_default, **given.model_dump(exclude_none=True))
    problems: dict[str, str] = {}
    try:
        settings.validate()
    except GenerationSettingsError as err:
        problems.update(err.problems)
    for name, (cap, flag) in config.option_caps().items():
        # The same check with this server's upper bound; where it fails, its message (naming the
        # flag that sets the cap) replaces the general one.
        problem = field_problem(name, getattr(settings, name), replace(RANGES[name], high=cap))
        if problem is not None:
            problems[name] = f"{problem} on this server ({flag})"
    if problems:
        raise ApiError(422, "bad_option", "; ".join(problems.values()))
    return settings.normalized()  # requests that decode alike share a batch


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "body"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field {where!r} (options: {', '.join(CaptionOptions.model_fields)})")
        else:
            parts.append(f"{where}: {e['msg']} (got {e.get('input')!r:.60})")
    return "; ".join(parts)


# --- request parsing -----------------------------------------------------------------------------
MAX_JSON_DEPTH = 32  # the request schema nests 3 deep; deeper is an attack on the parser
MAX_JSON_INT_DIGITS = 18  # any option fits; Python refuses int("1" * 4301) with a ValueError anyway
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPENERS, _CLOSERS = b"[{", b"]}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


@dataclass
class _Input:
    """One image of a request before decoding."""

    name: str
    data: bytes | None = None
    url: str | None = None
    error: ImageError | None = None


class _JSONValueError(ValueError):
    pass


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { outside strings (C-speed: strings cut by a regex, then a cumsum)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # fast path: cannot be deeper than the number of openers
    brackets = np.frombuffer(_JSON_STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise _JSONValueError(f"the integer {text[:20]}... has {len(text)} digits; at most {MAX_JSON_INT_DIGITS} "
                              "are accepted")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONValueError(f"the number {text[:40]} is out of range")
    return value


def _json_constant(text: str) -> Any:
    raise _JSONValueError(f"{text} is not valid JSON (NaN and Infinity are not numbers JSON allows)")


def parse_json_body(raw: bytes) -> Any:
    """Request body -> JSON value, or ApiError(400) naming what is wrong: invalid JSON, nesting deeper
    than MAX_JSON_DEPTH, NaN/Infinity literals, integers of more than MAX_JSON_INT_DIGITS digits or
    numbers that overflow a float. Never a RecursionError or a ValueError from deep inside `json`."""
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, "bad_json", f"the JSON body nests {depth} levels deep; at most {MAX_JSON_DEPTH} "
                                        "are accepted")
    try:
        return json.loads(raw, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except _JSONValueError as err:
        raise ApiError(400, "bad_json", f"the body is not acceptable JSON: {err}") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {err}") from None


def check_image_count(count: int, config: ServeConfig) -> None:
    if count > config.max_images_per_request:
        raise ApiError(413, "too_many_images",
                       f"{count} images in one request; this server accepts at most "
                       f"{config.max_images_per_request} (--max_images_per_request)")


def _json_image(i: int, entry: Any) -> _Input:
    """One entry of a JSON 'images' list -> _Input (its own error inside, never raised)."""
    name = f"images[{i}]"
    try:
        if isinstance(entry, str):
            return _Input(name=name, data=_b64decode(entry, name))
        src = ImageSource.model_validate(entry)
        name = src.name or name
        if (src.data is None) == (src.url is None):
            raise ImageError(422, "bad_image_entry", f"{name}: give exactly one of 'data' or 'url'")
        if src.url is not None:
            return _Input(name=name, url=src.url)
        return _Input(name=name, data=_b64decode(src.data, name))
    except ImageError as err:
        return _Input(name=name, error=err)
    except ValidationError as err:
        return _Input(name=name, error=ImageError(422, "bad_image_entry", f"{name}: {_validation_message(err)}"))


def json_request(payload: Any, config: ServeConfig) -> tuple[list[_Input], dict[str, Any]]:
    """A parsed JSON body -> (images, raw options), or ApiError for a body of the wrong shape."""
    if not isinstance(payload, dict):
        raise ApiError(422, "bad_request", "the JSON body must be an object with an 'images' list")
    images = payload.pop("images", None)
    if not isinstance(images, list):
        raise ApiError(422, "bad_request", "the JSON body needs 'images': a list of base64 strings or "
                                           "{\"data\": base64, \"name\": ...} / {\"url\": ...} objects")
    check_image_count(len(images), config)  # before any base64 is decoded
    return [_json_image(i, entry) for i, entry in enumerate(images)], payload


async def read_multipart(request: Request) -> tuple[list[_Input], dict[str, Any]]:
    """A multipart body -> (images, option fields parsed like CLI flags)."""
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
    return inputs, form_options(raw)


async def read_caption_request(request: Request, config: ServeConfig) -> tuple[list[_Input], BaseModel]:
    """POST /v1/captions body (multipart or JSON) -> (images, validated option fields), or ApiError."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        inputs, raw = await read_multipart(request)
    elif ctype == "application/json":
        inputs, raw = json_request(parse_json_body(await request.body()), config)
    else:
        raise ApiError(415, "unsupported_content_type",
                       f"Content-Type {ctype or '(none)'!r} is not accepted; send multipart/form-data "
                       "(image files + option fields) or application/json (base64 images)")
    if not inputs:
        raise ApiError(400, "no_images", "the request contains no image (multipart: add file fields; "
                                         "JSON: a non-empty 'images' list)")
    check_image_count(len(inputs), config)
    try:
        return inputs, CaptionOptions.model_validate(raw)
    except ValidationError as err:
        raise ApiError(422, "bad_option", _validation_message(err)) from None


# --- the service -------------------------------------------------------------------------------
def _page() -> str:
    return resources.files("prefixcap.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def describe_model(captioner: Any, config: ServeConfig) -> dict[str, Any]:
    """What is loaded, for GET /v1/model: artifact config, encoder, LM and the server's settings.
    Local paths appear by their folder's name only (see serve.config.public_name)."""
    cfg = getattr(captioner, "config", None)
    artifact = redact_paths(cfg.to_dict() if hasattr(cfg, "to_dict") else {})
    mapping = artifact.get("mapping", {})
    encoder: dict[str, Any] = {"name": public_name(getattr(captioner, "clip_model", artifact.get("clip_model"))),
                               "embedding_dim": mapping.get("prefix_size")}
    with contextlib.suppress(Exception):  # encoder loaded by the warm-up; a fake captioner has none
        enc = captioner.encoder
        encoder.update(backend=enc.spec.backend, source=public_name(enc.spec.name), embedding_dim=enc.embedding_dim)
    return {
        "model": public_name(config.model) or type(captioner).__name__,
        "prefixcap_version": __version__,
        "encoder": encoder,
        "language_model": {"name": public_name(artifact.get("language_model")), "family": artifact.get("lm_family")},
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


@dataclass
class Service:
    """What the routes share (app.state.service): the captioner, its batcher and the settings."""

    captioner: Any
    config: ServeConfig
    batcher: DynamicBatcher
    decode_limiter: Any  # anyio.CapacityLimiter: images decoded at once
    default_new_tokens: int
    model_name: str  # never a local path
    info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def preprocess(self) -> Callable | None:
        return getattr(self.captioner, "preprocess", None)


async def fetch_url(url: str, name: str, config: ServeConfig) -> bytes:
    """GET an image URL (only with --allow_urls), bounded by --max_upload_mb; ImageError on failure."""
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


async def prepare_image(item: _Input, svc: Service) -> Any:
    """Fetch (URL), decode and preprocess one image in a decoding thread; an ImageError is returned, not raised."""
    config, preprocess = svc.config, svc.preprocess
    try:
        if item.error is not None:
            raise item.error
        data = item.data if item.url is None else await fetch_url(item.url, item.name, config)

        def work() -> Any:
            image = decode_upload(data, item.name, config.max_image_pixels, config.image_formats)
            if preprocess is None:
                return image
            try:
                return preprocess(image)
            except Exception as err:  # noqa: BLE001 - reported for this image only
                raise ImageError(422, "preprocess_failed", f"{item.name}: cannot preprocess: {err}") from None

        return await anyio.to_thread.run_sync(work, limiter=svc.decode_limiter)
    except ImageError as err:
        return err


async def caption_prepared(prepared: list[Any], settings: GenerationSettings, svc: Service) -> dict[int, Any]:
    """Index -> captions (or the model's exception) for every image that decoded; 503 ApiError on overload."""
    ok = [i for i, p in enumerate(prepared) if not isinstance(p, ImageError)]
    if not ok:
        return {}
    try:
        outputs = await svc.batcher.submit([prepared[i] for i in ok], settings)
    except (QueueFull, RequestTimeout) as exc:
        code = "queue_full" if isinstance(exc, QueueFull) else "timeout"
        raise ApiError(503, code, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except BatcherClosed as exc:
        raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "5"}) from None
    return dict(zip(ok, outputs))


def image_results(inputs: list[_Input], prepared: list[Any], captions: dict[int, Any]) -> tuple[list[dict], int]:
    """One result per image, in order, and the response status: 200 when any image was captioned,
    else those images' error status (400 if they differ)."""
    results: list[dict[str, Any]] = []
    for i, item in enumerate(inputs):
        result: dict[str, Any] = {"index": i, "name": item.name}
        out = captions.get(i, prepared[i])
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
    if statuses and all("error" in r for r in results):
        return results, statuses.pop() if len(statuses) == 1 else 400  # nothing captioned: say why
    return results, 200


# --- routes --------------------------------------------------------------------------------------
async def captions_route(request: Request) -> JSONResponse:
    svc: Service = request.app.state.service
    start = time.perf_counter()
    inputs, given = await read_caption_request(request, svc.config)
    settings = resolve_options(given, svc.config, svc.default_new_tokens)
    prepared = await asyncio.gather(*(prepare_image(item, svc) for item in inputs))
    results, status = image_results(inputs, prepared, await caption_prepared(prepared, settings, svc))
    body = {"model": svc.model_name, "options": asdict(settings), "results": results,
            "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}
    return JSONResponse(body, status)


async def index_route(request: Request) -> HTMLResponse:
    return HTMLResponse(_page())


async def healthz_route(request: Request) -> dict[str, Any]:
    svc: Service = request.app.state.service
    return {"status": "ok", "model": svc.model_name, "uptime_s": round(time.time() - svc.started, 3),
            "batcher": svc.batcher.stats.as_dict()}


async def model_route(request: Request) -> dict[str, Any]:
    return request.app.state.service.info


def _caption_route_doc() -> dict[str, Any]:
    error_doc = {"model": ErrorResponse}
    body_doc = {"requestBody": {
        "required": True,
        "description": "multipart/form-data: image files (any field name) plus option fields; "
                       "or application/json: CaptionJSONRequest.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                               **CaptionOptions.model_json_schema()["properties"]},
                "required": ["images"],
            }},
            "application/json": {"schema": {"$ref": "#/components/schemas/CaptionJSONRequest"}},
        },
    }}
    return dict(response_model=CaptionResponse, summary="caption one or more images", openapi_extra=body_doc,
                responses={400: error_doc, 408: error_doc, 413: error_doc, 415: error_doc, 422: error_doc,
                           503: {"model": ErrorResponse, "description": "busy, queue full or timed out; see "
                                                                        "Retry-After"}})


def _install_routes(app: FastAPI) -> None:
    app.add_api_route("/", index_route, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/healthz", healthz_route, methods=["GET"], summary="liveness and batching counters")
    app.add_api_route("/v1/model", model_route, methods=["GET"],
                      summary="the loaded model, encoder, language model and server limits")
    app.add_api_route("/v1/captions", captions_route, methods=["POST"], **_caption_route_doc())


def _install_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": {...}}; a 500 (a bug, never the client's input) closes the connection."""

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    async def disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return _error_response(400, "client_disconnected", "the client closed the connection mid-request",
                               {"Connection": "close"})

    async def server_fault(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "internal_error", f"internal server error ({type(exc).__name__}); "
                                                      "the request was not the cause", {"Connection": "close"})

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, disconnected)
    app.add_exception_handler(Exception, server_fault)


def _install_openapi(app: FastAPI) -> None:
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


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    svc: Service = app.state.service
    if svc.config.warmup:
        blank = Image.new("RGB", (64, 64), (127, 127, 127))
        preprocess = svc.preprocess
        await anyio.to_thread.run_sync(
            lambda: svc.captioner.caption([preprocess(blank) if preprocess else blank], batch_size=1,
                                          settings=GenerationSettings(max_new_tokens=2)))
    svc.info.update(describe_model(svc.captioner, svc.config))
    svc.info["limits"]["default_max_new_tokens"] = svc.default_new_tokens
    await svc.batcher.start()
    svc.started = time.time()
    try:
        yield
    finally:
        await svc.batcher.stop()


def create_app(captioner: Captioner, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app around any object with `caption(images, batch_size, settings)`; tests pass a fake one.

    If the captioner also has `preprocess(image) -> pixels` (prefixcap's Captioner does), images
    are preprocessed in the request's thread, so the model thread only runs the networks and a
    queued image holds a small pixel array instead of a full-size picture. In front of the routes,
    serve.guards check the Host header and bound request bodies (size, bytes in flight, deadline).
    """
    config = config or ServeConfig()
    svc = Service(captioner=captioner, config=config, batcher=DynamicBatcher(captioner, config.batch),
                  decode_limiter=anyio.CapacityLimiter(config.decode_threads),
                  default_new_tokens=_default_max_new_tokens(captioner, config),
                  model_name=public_name(config.model) or type(captioner).__name__)
    app = FastAPI(title="prefixcap", version=__version__, lifespan=_lifespan,
                  description="ClipCap-style image captioning: upload images, get captions. "
                              "Concurrent requests are batched on the model.")
    app.state.service, app.state.batcher, app.state.config = svc, svc.batcher, config
    app.state.body_budget = BodyBudget(config.max_inflight_bytes)
    # Added last = runs first: the Host check refuses before any body byte is read.
    app.add_middleware(BodyGuard, max_bytes=config.max_upload_bytes, budget=app.state.body_budget,
                       body_timeout_s=config.body_timeout_s, on_done=MemoryTrimmer())
    app.add_middleware(HostGuard, allowed=config.hosts())
    _install_error_handlers(app)
    _install_routes(app)
    _install_openapi(app)
    return app
