"""Reading a caption request: the body (multipart or JSON, guarded), its images' bytes and its options.

Each image's problem becomes an ImageError kept beside it (the other images go on); a problem with
the request as a whole is an ApiError (serve.guards).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image
from pydantic import BaseModel, ValidationError

from prefixcap.argtypes import boolean
from prefixcap.data.images import decode_image
from prefixcap.generation import (FIELD_NAMES, RANGES, GenerationSettings, GenerationSettingsError, field_problem,
                                  parse_field)
from prefixcap.serve.config import SAFE_IMAGE_FORMATS, ServeConfig
from prefixcap.serve.guards import ApiError
from prefixcap.serve.schemas import CaptionRequestOptions, ImageSource


class ImageError(Exception):
    """One image's error; reported in its result while the other images are captioned."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "status": self.status, "message": self.message}


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
_FLAGS = ("retrieved",)  # the request's true/false fields that are not decoding options


def _flag(text: str) -> bool:
    try:
        return boolean(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"expected true or false, got {text.strip()[:40]!r}") from None


def form_options(raw: dict[str, str]) -> dict[str, Any]:
    """Multipart option fields (text) -> typed values, as the CLI parses its flags; ApiError(422) naming
    each field that does not parse. Unknown fields pass through for the schema to name them."""
    values, problems = {}, []
    for key, text in raw.items():
        if key not in FIELD_NAMES and key not in _FLAGS:
            values[key] = text
            continue
        try:
            values[key] = parse_field(key, text) if key in FIELD_NAMES else _flag(text)
        except ValueError as err:
            problems.append(f"{key}: {err}")
    if problems:
        raise ApiError(422, "bad_option", "; ".join(problems))
    return values


def resolve_options(given: BaseModel, config: ServeConfig, default_max_new_tokens: int) -> GenerationSettings:
    """Client options over the server's defaults -> validated, normalized GenerationSettings, or
    ApiError(422) naming each bad option and its allowed range (this server's cap where it is lower)."""
    server_default = GenerationSettings(max_new_tokens=default_max_new_tokens)
    settings = replace(server_default, **given.model_dump(exclude_none=True, include=set(FIELD_NAMES)))
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
            parts.append(f"unknown field {where!r} (options: {', '.join(CaptionRequestOptions.model_fields)})")
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
class RequestImage:
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


def _json_image(i: int, entry: Any) -> RequestImage:
    """One entry of a JSON 'images' list -> RequestImage (its own error inside, never raised)."""
    name = f"images[{i}]"
    try:
        if isinstance(entry, str):
            return RequestImage(name=name, data=_b64decode(entry, name))
        src = ImageSource.model_validate(entry)
        name = src.name or name
        if (src.data is None) == (src.url is None):
            raise ImageError(422, "bad_image_entry", f"{name}: give exactly one of 'data' or 'url'")
        if src.url is not None:
            return RequestImage(name=name, url=src.url)
        return RequestImage(name=name, data=_b64decode(src.data, name))
    except ImageError as err:
        return RequestImage(name=name, error=err)
    except ValidationError as err:
        return RequestImage(name=name, error=ImageError(422, "bad_image_entry", f"{name}: {_validation_message(err)}"))


def json_request(payload: Any, config: ServeConfig) -> tuple[list[RequestImage], dict[str, Any]]:
    """A parsed JSON body -> (images, raw options), or ApiError for a body of the wrong shape."""
    if not isinstance(payload, dict):
        raise ApiError(422, "bad_request", "the JSON body must be an object with an 'images' list")
    images = payload.pop("images", None)
    if not isinstance(images, list):
        raise ApiError(422, "bad_request", "the JSON body needs 'images': a list of base64 strings or "
                                           "{\"data\": base64, \"name\": ...} / {\"url\": ...} objects")
    check_image_count(len(images), config)  # before any base64 is decoded
    return [_json_image(i, entry) for i, entry in enumerate(images)], payload


async def read_multipart(request: Request) -> tuple[list[RequestImage], dict[str, Any]]:
    """A multipart body -> (images, option fields parsed like CLI flags)."""
    inputs: list[RequestImage] = []
    raw: dict[str, Any] = {}
    # Files spool to disk past 1 MB and the body limit bounds them all; the image count is
    # checked by the caller so that it gets this server's message.
    async with request.form(max_fields=64, max_part_size=64 * 1024) as form:
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key not in CaptionRequestOptions.model_fields and key in ("images", "image", "file", "files"):
                    raise ApiError(422, "bad_request", f"form field {key!r} is text, not a file: send the "
                                                       f"image as a file part (curl -F {key}=@photo.jpg)")
                raw[key] = value
            else:
                name = value.filename or f"{key}[{len(inputs)}]"
                inputs.append(RequestImage(name=name, data=await value.read()))
    return inputs, form_options(raw)


async def read_caption_request(request: Request, config: ServeConfig) -> tuple[list[RequestImage], BaseModel]:
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
        return inputs, CaptionRequestOptions.model_validate(raw)
    except ValidationError as err:
        raise ApiError(422, "bad_option", _validation_message(err)) from None


# --- image URLs (--allow_urls) ----------------------------------------------------------------------
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
