"""HTTP captioning service: the FastAPI app (captions, health, model info, web page).

Every bad input is answered with a 4xx and a message naming the image and the limit; an image
that fails never fails the other images of its request, and a 500 (a bug, never the input) comes
with `Connection: close`. Memory is bounded by construction: request bodies by --max_upload_mb and
together by --max_inflight_mb (serve.guards), decoded images by --max_image_pixels times the few
decoding threads, and queued work by --max_queue preprocessed images (a few hundred KB each).
Reading a request: serve.requests, its schemas: serve.schemas; running it: serve.http (uvicorn,
connection limits and deadlines) and serve.cli (`prefixcap serve`).
"""


import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from prefixcap import __version__
from prefixcap.generation import GenerationSettings
from prefixcap.serve.batching import BatchCaptioner, BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout
from prefixcap.serve.config import ServeConfig, public_name, redact_paths
from prefixcap.serve.guards import ApiError, BodyBudget, BodyGuard, HostGuard, RequestLimit
from prefixcap.serve.memory import MemoryTrimmer
from prefixcap.serve.requests import (ImageError, RequestImage, decode_upload, fetch_url, read_caption_request,
                                     resolve_options)
from prefixcap.serve.schemas import CaptionJSONRequest, CaptionRequestOptions, CaptionResponse, ErrorResponse

logger = logging.getLogger(__name__)


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "status": status, "message": message}}, status, headers=headers)


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
        "retrieval": _retrieval(captioner),
        "device": str(getattr(captioner, "device", config.device)),
        "artifact": artifact,
        "limits": config.limits(),
    }


def _retrieval(captioner: Any) -> dict[str, Any] | None:
    """The datastore a retrieval model searches (per batch), by its folder's name; None without retrieval."""
    retriever = getattr(captioner, "retriever", None)
    if retriever is None:
        return None
    return {"k": retriever.settings.k, "prompt_format": retriever.settings.prompt_format,
            "datastore": public_name(str(retriever.datastore.path)), "captions": len(retriever.datastore)}


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


async def prepare_image(item: RequestImage, svc: Service) -> Any:
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


async def caption_request(prepared: list[Any], settings: GenerationSettings, svc: Service,
                          retrieved: bool = False) -> dict[int, Any]:
    """Index -> Captions (or the model's exception) for every image that decoded; 503 ApiError on overload."""
    ok = [i for i, p in enumerate(prepared) if not isinstance(p, ImageError)]
    if not ok:
        return {}
    try:
        outputs = await svc.batcher.submit([prepared[i] for i in ok], settings, retrieved=retrieved)
    except (QueueFull, RequestTimeout) as exc:
        code = "queue_full" if isinstance(exc, QueueFull) else "timeout"
        raise ApiError(503, code, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except BatcherClosed as exc:
        raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "5"}) from None
    return dict(zip(ok, outputs))


def image_results(inputs: list[RequestImage], prepared: list[Any], captions: dict[int, Any],
                  retrieved: bool = False) -> tuple[list[dict], int]:
    """One result per image, in order, and the response status: 200 when any image was captioned,
    else those images' error status (400 if they differ). With `retrieved`, a captioned image's result
    also lists the captions its prompt was built from, with their scores."""
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
            result.update(caption=out[0] if out else "", captions=list(out))
            if retrieved:
                result["retrieved"] = [{"caption": r.caption, "score": round(r.score, 6)}
                                       for r in getattr(out, "retrieved", None) or []]
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
    retrieved = bool(given.retrieved)  # unset (None) is false
    if retrieved and getattr(svc.captioner, "retriever", None) is None:
        raise ApiError(422, "no_retrieval", "retrieved=true: this model was trained without retrieval, so it "
                                            "has no retrieved captions to show (GET /v1/model: \"retrieval\" is "
                                            "null); leave 'retrieved' out or false")
    prepared = await asyncio.gather(*(prepare_image(item, svc) for item in inputs))
    captions = await caption_request(prepared, settings, svc, retrieved)
    results, status = image_results(inputs, prepared, captions, retrieved)
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
                               **CaptionRequestOptions.model_json_schema()["properties"]},
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


def create_app(captioner: BatchCaptioner, config: ServeConfig | None = None) -> FastAPI:
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
    # Outermost: requests in progress (--max_connections), and the 503 for those cut by a shutdown.
    app.add_middleware(RequestLimit, max_requests=config.max_connections)
    _install_error_handlers(app)
    _install_routes(app)
    _install_openapi(app)
    return app
