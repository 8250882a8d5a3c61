"""The OpenAPI document at /openapi.json, made to describe what the server really answers: OpenAI's 400 error
body instead of FastAPI's 422, every status each route sends, the streaming content type, the server's
``max_tokens`` cap, and the fields it refuses (documented as null-only, so a client generated from the document
never sends them)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from kuberlhf.serving.protocol import (
    MAX_STOP_SEQUENCES,
    UNSUPPORTED,
    ChatCompletion,
    ErrorResponse,
    ModelList,
    ModelObject,
)

_ERRORS = {
    400: "Invalid request (OpenAI's invalid_request_error; `param` names the field)",
    401: "Missing or wrong API key (only when the server runs with one)",
    404: "Unknown model or route",
    405: "Method not allowed",
    413: "Request body over the server's limit",
    429: "All generation slots and the queue are busy; retry after `Retry-After` seconds",
    503: "The model is still loading (or failed to load)",
}
_REFUSED_SCHEMAS: dict[str, dict] = {
    "tool_choice": {"anyOf": [{"const": "none"}, {"type": "null"}]},
    "response_format": {
        "anyOf": [
            {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]},
            {"type": "null"},
        ]
    },
    "modalities": {"anyOf": [{"type": "array", "items": {"const": "text"}, "maxItems": 1}, {"type": "null"}]},
}


def token_id_pattern(vocab: int) -> str:
    """A regex of the decimal numbers 0..vocab-1 (logit_bias keys), e.g. 512 -> 0-9, 10-99, 100-499, 500-509, 510-511."""
    top = str(vocab - 1)
    alts = ["[0-9]"] if len(top) > 1 else []
    alts += [f"[1-9][0-9]{{{k - 1}}}" for k in range(2, len(top))]
    for i, digit in enumerate(top):
        low = 1 if i == 0 and len(top) > 1 else 0
        if int(digit) > low:
            rest = len(top) - i - 1
            alts.append(top[:i] + f"[{low}-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alts.append(top)
    return "^(?:" + "|".join(alts) + ")$"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict:
    return {"application/json": {"schema": _ref(name)}}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": _ERRORS[c], "content": _json("ErrorResponse")} for c in codes}


def _add_models(schemas: dict, *models: type[BaseModel]) -> None:
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema


def build_openapi(app: FastAPI, max_new_tokens: int, auth: bool, vocab: int | None = None) -> dict[str, Any]:
    # a copy: FastAPI shares the dicts of its generated schemas between calls, and they are edited below
    doc = copy.deepcopy(get_openapi(title=app.title, version=app.version, routes=app.routes))
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _add_models(schemas, ErrorResponse, ChatCompletion, ModelList, ModelObject)
    key = (401,) if auth else ()
    responses = {
        ("post", "/v1/chat/completions"): {
            "200": {
                "description": "The answer: a chat.completion, or with `stream: true` server-sent "
                "chat.completion.chunk events ending in `data: [DONE]`",
                "content": {**_json("ChatCompletion"), "text/event-stream": {"schema": {"type": "string"}}},
            },
            **_errors(400, *key, 404, 413, 429, 503),
        },
        ("get", "/v1/models"): {
            "200": {"description": "The served model", "content": _json("ModelList")},
            **_errors(*key),
        },
        ("get", "/v1/models/{model}"): {
            "200": {"description": "The served model", "content": _json("ModelObject")},
            **_errors(*key, 404),
        },
        ("get", "/healthz"): {
            "200": {"description": "The process is up", "content": {"application/json": {"schema": {"type": "object"}}}}
        },
        ("get", "/readyz"): {
            "200": {
                "description": "The model is loaded",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "503": {
                "description": "Loading, or failed",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
        },
        ("get", "/metrics"): {
            "200": {"description": "Prometheus metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(*key),
        },
    }
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if (method, path) in responses:
                op["responses"] = responses[(method, path)]
            if auth and (path.startswith("/v1/") or path == "/metrics"):
                op["security"] = [{"apiKey": []}]
    if auth:
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    request = schemas["ChatCompletionRequest"]["properties"]
    for name in ("max_tokens", "max_completion_tokens"):
        request[name]["anyOf"][0]["maximum"] = max_new_tokens
    request["n"]["anyOf"][0]["maximum"] = 1  # one choice per request
    request["stop"]["anyOf"][1]["maxItems"] = MAX_STOP_SEQUENCES
    # the server needs a user message (a system prompt alone has nothing to answer)
    schemas["ChatCompletionRequest"]["properties"]["messages"]["contains"] = {
        "type": "object",
        "properties": {"role": {"const": "user"}},
        "required": ["role"],
    }
    bias = request["logit_bias"]["anyOf"][0]
    (values,) = bias.pop("patternProperties").values()
    # keys are token ids of this model's vocabulary (known once it is loaded)
    bias["patternProperties"] = {token_id_pattern(vocab) if vocab else "^(0|[1-9][0-9]{0,8})$": values}
    bias["additionalProperties"] = False
    for name in UNSUPPORTED:
        request[name] = {
            **_REFUSED_SCHEMAS.get(name, {"type": "null"}),
            "description": f"Not supported by this server: {UNSUPPORTED[name]}",
        }
    return doc


def install_openapi(
    app: FastAPI, max_new_tokens: int, auth: bool = False, vocab: Callable[[], int | None] = lambda: None
) -> None:
    """Serve :func:`build_openapi` (kept once the model, and so its vocabulary, is loaded)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        size = vocab()
        doc = build_openapi(app, max_new_tokens, auth, size)
        if size is not None:
            app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
