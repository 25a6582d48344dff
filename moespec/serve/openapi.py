"""The served OpenAPI schema (`/openapi.json`): each route's request body and every response it gives.

Bodies are parsed by hand (protocol.py) to keep OpenAI's error shape, so FastAPI cannot see them;
this module declares them from the same pydantic models, with the responses and error statuses
each route really returns, so clients and fuzzers read a schema the server keeps. The `model`
field of a generation request lists the one model served.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from .protocol import (ChatCompletionResponse, ChatRequest, CompletionRequest, CompletionResponse, DetokenizeRequest,
                       DetokenizeResponse, ErrorResponse, Health, ModelCard, ModelList, TokenizeRequest,
                       TokenizeResponse)

ERRORS = {400: "the request is invalid (the message and `param` say what)", 404: "no such model",
          413: "the body is larger than --max-body-bytes", 415: "the body is not declared as application/json",
          429: "the server holds --max-batch-size + --max-queue requests: retry later",
          503: "the engine is not running, or the server is shutting down"}
BODY_ERRORS = (400, 404, 413, 415)
GENERATION_ERRORS = (*BODY_ERRORS, 429, 503)
EVENT_STREAM = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events, "
                                                 "OpenAI chunks then `data: [DONE]` (with stream=true)"}}}

# path -> (request body model, 200 response model, error statuses)
ROUTES: dict[str, tuple[type[BaseModel] | None, type[BaseModel] | None, tuple[int, ...]]] = {
    "/v1/models": (None, ModelList, ()),
    "/v1/models/{model_id:path}": (None, ModelCard, (404,)),
    "/v1/completions": (CompletionRequest, CompletionResponse, GENERATION_ERRORS),
    "/v1/chat/completions": (ChatRequest, ChatCompletionResponse, GENERATION_ERRORS),
    "/tokenize": (TokenizeRequest, TokenizeResponse, BODY_ERRORS),
    "/detokenize": (DetokenizeRequest, DetokenizeResponse, BODY_ERRORS),
    "/metrics": (None, None, ()),
    "/health": (None, Health, (503,)),
}
GENERATION = {"/v1/completions", "/v1/chat/completions"}


def route_docs(path: str) -> dict[str, Any]:
    """Keyword arguments of `add_api_route` that document route `path`."""
    body, answer, errors = ROUTES[path]
    responses: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": ERRORS[code]}
                                                  for code in errors}
    kwargs: dict[str, Any] = {"response_model": None}
    if answer is None:  # the Prometheus text page
        kwargs["response_class"] = PlainTextResponse
    else:
        responses[200] = {"model": answer, **({"content": EVENT_STREAM} if path in GENERATION else {})}
    if body is not None:
        kwargs["openapi_extra"] = {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}}
    return {**kwargs, "responses": responses}


def openapi_schema(app: FastAPI, model_name: str) -> dict[str, Any]:
    """FastAPI's schema of `app` with the request bodies' models added (made once, then cached)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, (body, _, _) in ROUTES.items():
            if body is None:
                continue
            model = body.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model.pop("$defs", {}))
            if path in GENERATION:
                model["properties"]["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
            components[body.__name__] = model
        app.openapi_schema = schema
    return app.openapi_schema
