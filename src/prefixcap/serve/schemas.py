"""The HTTP service's request and response schemas (pydantic), as the OpenAPI document shows them."""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from prefixcap.generation import GenerationSettings, expectation


def _options_model() -> type[BaseModel]:
    """The request's decoding options, one optional field per GenerationSettings field.

    Types are strict for JSON (`"num_beams": "5"`, `5.0` or `true` is a 422, never coerced; an
    integer is accepted for a float field). Multipart form fields are text, parsed like the CLI
    flags by `serve.requests.form_options` before this model sees them. Ranges are checked by the one
    `GenerationSettings.validate()` (then this server's caps) in `serve.requests.resolve_options`.
    """
    hints = typing.get_type_hints(GenerationSettings)
    options = {f.name: (hints[f.name] | None, Field(None, strict=True,
                                                    description=f"{f.metadata['help']}; {expectation(f.name)}"))
               for f in fields(GenerationSettings)}
    return create_model("CaptionOptions", __config__=ConfigDict(extra="forbid"), __module__=__name__,
                        __doc__="Decoding options; unset ones take the server's defaults. Limits: GET /v1/model.",
                        **options)


CaptionOptions = _options_model()


class CaptionRequestOptions(CaptionOptions):
    """A request's options: the decoding options and what the answer should carry besides the captions."""

    retrieved: bool | None = Field(None, strict=True, description=(
        "retrieval models only (GET /v1/model: \"retrieval\" not null; else a 422 no_retrieval): each result "
        "also lists the k captions retrieved for the image's prompt, with their similarity scores"))


class ImageSource(BaseModel):
    """One image of a JSON request: base64 bytes (a data: URL works too) or, if enabled, a URL."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(None, description="base64-encoded image file, optionally as a data: URL")
    url: str | None = Field(None, description="http(s) URL; only when the server runs with --allow_urls")
    name: str | None = Field(None, description="echoed back in the result")


class CaptionJSONRequest(CaptionRequestOptions):
    """JSON body of POST /v1/captions: images as base64 strings or ImageSource objects."""

    images: list[str | ImageSource] = Field(..., description="base64 strings or {data|url, name} objects")


class ImageErrorBody(BaseModel):
    code: str
    status: int
    message: str


class RetrievedCaption(BaseModel):
    caption: str
    score: float = Field(..., description="cosine similarity of the image's and the caption's CLIP embeddings")


class ImageResult(BaseModel):
    index: int
    name: str | None = None
    caption: str | None = Field(None, description="the first (best) caption")
    captions: list[str] | None = Field(None, description="all captions (num_return_sequences)")
    retrieved: list[RetrievedCaption] | None = Field(
        None, description="with retrieved=true: the captions the image's prompt was built from, most similar first")
    error: ImageErrorBody | None = None


class CaptionResponse(BaseModel):
    model: str
    options: dict[str, Any]
    results: list[ImageResult]
    elapsed_ms: float


class ErrorResponse(BaseModel):
    error: ImageErrorBody
