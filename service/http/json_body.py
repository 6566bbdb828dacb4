"""JSON bodies read, parsed and validated off the event loop.

FastAPI parses a declared body model with `json.loads` and validates it on the event loop,
before any dependency runs: a 100 MB job body held the loop (and every other request,
/healthz included) for seconds. A route that takes a large body declares it as
`Annotated[Model, Depends(json_body(Model))]` instead: the bytes are read asynchronously and
parsed and validated in a worker thread. The route's OpenAPI entry still documents the body
(`body_schema`), with the model's schema added to the components (`document_bodies`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

M = TypeVar("M", bound=BaseModel)
DOCUMENTED: list[type[BaseModel]] = []


def validate(model: type[M], raw: bytes) -> M:
    """As FastAPI does it (json.loads, then the model in Python mode: the same values are accepted
    and refused, lone surrogates included), only in a worker thread."""
    try:
        value = json.loads(raw) if raw else None
    except RecursionError:
        raise HTTPException(400, "There was an error parsing the body: nested too deeply") from None
    except ValueError as exc:
        position = getattr(exc, "pos", 0)
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", position), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": getattr(exc, "msg", str(exc))}}]) from None
    try:
        return model.model_validate(value)
    except ValidationError as exc:  # rendered like any body error: loc starts with "body"
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    DOCUMENTED.append(model)

    async def parsed(request: Request) -> M:
        raw = await request.body()
        return await run_in_threadpool(validate, model, raw)

    return parsed


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def document_bodies(app: FastAPI) -> None:
    """Add the models of `json_body` routes (and the models they use) to the schema's components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in DOCUMENTED:
            own = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in own.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components.setdefault(model.__name__, own)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
