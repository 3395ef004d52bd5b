"""The HTTP surface of ``samtone serve``, without Ray: request parsing, limits, OpenAI-shaped errors.

Every rejection is an :class:`ApiError`, rendered as OpenAI's error JSON
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, so the official ``openai``
client raises a readable exception instead of retrying (it retries 408/409/429/5xx).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

InputType = Literal["query", "document"]
ENCODING_FORMATS = ("float", "base64")
INPUT_TYPES = ("query", "document")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _shown(value: Any) -> str:
    """A client's value quoted in an error, at most 80 characters of it."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return ApiError(400, message, param=param, code=code, type=type).body()


@dataclass(frozen=True)
class Limits:
    max_inputs: int
    max_input_chars: int
    max_body_bytes: int
    max_top_k: int
    max_search_results: int

    @classmethod
    def of(cls, serve_cfg) -> Limits:
        return cls(*(getattr(serve_cfg, f.name) for f in fields(cls)))


# ----------------------------------------------------------------------------------- bodies


def check_content_type(content_type: str | None) -> None:
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {content_type or 'none'}", code="unsupported_media_type")


def check_declared_length(content_length: str | None, limits: Limits) -> None:
    if content_length is not None and content_length.isdigit() and int(content_length) > limits.max_body_bytes:
        raise _too_large(limits)


def check_body_size(size: int, limits: Limits) -> None:
    """Called while the body streams in, so an oversized body is refused before it is all read."""
    if size > limits.max_body_bytes:
        raise _too_large(limits)


def _too_large(limits: Limits) -> ApiError:
    return ApiError(413, f"request body is larger than the limit of {limits.max_body_bytes} bytes", code="request_too_large")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # [[[[... deeper than the parser's stack
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_body")
    return body


# ----------------------------------------------------------------------------------- /v1/embeddings


@dataclass(frozen=True)
class EmbeddingsRequest:
    texts: list[str]
    model: str
    encoding_format: str
    input_type: InputType


# OpenAI's fields plus the input_type extension. Any other field is refused (422 naming it), not
# ignored: a misspelt option (``encodingformat``) would otherwise silently do nothing.
_EMBEDDINGS_KEYS = {"input", "model", "encoding_format", "dimensions", "user", "input_type"}


def _refuse_unknown(body: dict[str, Any], known: set[str], route: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(
            422, f"unknown field {_shown(unknown[0])}; {route} takes {', '.join(sorted(known))}", param=unknown[0], code="unknown_field"
        )


def check_model(body: dict[str, Any], served_name: str, required: bool) -> str:
    """The served name only: a model's path or URI is not a name clients are given."""
    if "model" not in body:
        if required:
            raise ApiError(422, "'model' is required (GET /v1/models lists the served model)", param="model", code="missing_field")
        return served_name
    model = body["model"]
    if model != served_name:
        raise ApiError(404, f"model {_shown(model)} is not served here; use {served_name!r}", param="model", code="model_not_found")
    return model


def parse_embeddings(body: dict[str, Any], limits: Limits, served_name: str, dim: int) -> EmbeddingsRequest:
    _refuse_unknown(body, _EMBEDDINGS_KEYS, "/v1/embeddings")
    model = check_model(body, served_name, required=True)
    if "input" not in body:
        raise ApiError(422, "'input' is required: a string or a list of strings", param="input", code="missing_field")
    texts = parse_texts(body["input"], "input", limits)
    fmt = body.get("encoding_format", "float")
    if not isinstance(fmt, str) or fmt not in ENCODING_FORMATS:
        raise ApiError(422, f"encoding_format must be one of {ENCODING_FORMATS}, got {_shown(fmt)}", param="encoding_format", code="invalid_value")
    dims = body.get("dimensions")
    if "dimensions" in body and (type(dims) is not int or dims != dim):
        raise ApiError(
            422,
            f"dimensions={_shown(dims)}: this model only gives {dim}-dimensional embeddings; it was not trained for "
            "shortened (Matryoshka) vectors, so truncating them would lose quality. Omit 'dimensions' or send "
            f"{dim}.",
            param="dimensions",
            code="invalid_value",
        )
    input_type = body.get("input_type", "document")
    if not isinstance(input_type, str) or input_type not in INPUT_TYPES:
        raise ApiError(422, f"input_type must be one of {INPUT_TYPES}, got {_shown(input_type)}", param="input_type", code="invalid_value")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(422, "'user' must be a string", param="user", code="invalid_type")
    return EmbeddingsRequest(texts, model, fmt, input_type)


def parse_texts(value: Any, param: str, limits: Limits) -> list[str]:
    """A string or a non-empty list of non-empty strings, within the count and length limits."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise ApiError(422, f"'{param}' must be a string or a list of strings, got {type(value).__name__}", param=param, code="invalid_type")
    if not texts:
        raise ApiError(422, f"'{param}' is an empty list: send at least one text", param=param, code="invalid_value")
    if _is_token_ids(texts):
        raise ApiError(
            422, f"'{param}' holds token ids: token-id arrays are not supported here, send the texts instead", param=param, code="unsupported_input"
        )
    if len(texts) > limits.max_inputs:
        raise ApiError(422, f"'{param}' has {len(texts)} texts, over the limit of {limits.max_inputs} per request", param=param, code="too_many_inputs")
    for i, text in enumerate(texts):
        where = param if isinstance(value, str) else f"{param}[{i}]"
        if not isinstance(text, str):
            raise ApiError(422, f"{where} must be a string, got {type(text).__name__}", param=where, code="invalid_type")
        if not text.strip():
            raise ApiError(422, f"{where} is empty: send some text", param=where, code="invalid_value")
        if len(text) > limits.max_input_chars:
            raise ApiError(422, f"{where} has {len(text)} characters, over the limit of {limits.max_input_chars}", param=where, code="input_too_long")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # JSON's \ud800 escapes give lone surrogates
                raise ApiError(422, f"{where} is not valid Unicode: {exc.reason} at character {exc.start}", param=where, code="invalid_unicode") from None
    return texts


def _is_token_ids(texts: list) -> bool:
    def ints(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    return all(ints(t) for t in texts) or all(isinstance(t, list) and all(ints(x) for x in t) for t in texts)


def embedding_payload(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """float: the float32 array itself, written as a JSON list by ``FastJSONResponse`` (each value in
    its shortest form that reads back as the same float32); base64: little-endian float32 bytes, as
    OpenAI sends."""
    vector = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return vector


def embeddings_response(vectors: np.ndarray, encoding_format: str, model: str, version: str | None, tokens: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": embedding_payload(v, encoding_format)} for i, v in enumerate(vectors)
        ],
        "model": model,
        "model_version": version,  # extension: the registry version that produced these vectors
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# ----------------------------------------------------------------------------------- /search

_SEARCH_KEYS = {"query", "queries", "top_k", "model"}


@dataclass(frozen=True)
class SearchRequest:
    queries: list[str]
    top_k: int
    single: bool  # {"query": ...} rather than {"queries": [...]}


def parse_search(body: dict[str, Any], limits: Limits, served_name: str) -> SearchRequest:
    _refuse_unknown(body, _SEARCH_KEYS, "/search")
    check_model(body, served_name, required=False)
    if ("query" in body) == ("queries" in body):
        raise ApiError(422, "give exactly one of 'query' (a string) or 'queries' (a list of strings)", param="query", code="missing_field")
    if "query" in body:
        if not isinstance(body["query"], str):
            raise ApiError(422, f"'query' must be a string, got {type(body['query']).__name__}", param="query", code="invalid_type")
        queries, single = parse_texts(body["query"], "query", limits), True
    else:
        if not isinstance(body["queries"], list):
            raise ApiError(422, "'queries' must be a list of strings", param="queries", code="invalid_type")
        queries, single = parse_texts(body["queries"], "queries", limits), False
    top_k = body.get("top_k", 10)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limits.max_top_k:
        raise ApiError(422, f"top_k must be an integer from 1 to {limits.max_top_k}, got {_shown(top_k)}", param="top_k", code="invalid_value")
    if len(queries) * top_k > limits.max_search_results:  # each hit carries its document's text
        raise ApiError(
            422,
            f"{len(queries)} queries x top_k {top_k} = {len(queries) * top_k} hits, over the limit of "
            f"{limits.max_search_results} hits per request (serve.max_search_results): send fewer queries or a smaller top_k",
            param="top_k",
            code="too_many_results",
        )
    return SearchRequest(queries, top_k, single)
