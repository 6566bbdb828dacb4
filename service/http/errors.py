"""One renderer for every error: `{"error": {"code", "message", ...}}` with its status."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.db import is_transient
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import MethodNotAllowed, NotFound, TeachercacheError, Unavailable, ValidationFailed

def location(loc: tuple) -> str:
    """('body', 'requests', 3, 'prompt') -> 'requests[3].prompt'."""
    text = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "body"


def validation_failed(exc: RequestValidationError) -> ValidationFailed:
    first = exc.errors()[0]
    where = location(tuple(first.get("loc", ())))
    details = {"field": where, "errors": [{"field": location(tuple(e.get("loc", ()))), "message": e.get("msg")}
                                          for e in exc.errors()[:20]]}
    loc = first.get("loc", ())
    if len(loc) > 2 and loc[1] == "requests" and isinstance(loc[2], int):
        details["request_index"] = loc[2]
    return ValidationFailed(f"{where}: {first.get('msg')}", **details)


def render(exc: TeachercacheError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)


# Starlette's own errors (unknown route, wrong method, a body over the limit) in the same shape.
HTTP_CODES = {404: NotFound, 405: MethodNotAllowed}


def from_http_exception(exc: StarletteHTTPException) -> TeachercacheError:
    error = getattr(exc, "error", None)  # BodyTooLarge carries the LimitExceeded it stands for
    if isinstance(error, TeachercacheError):
        return error
    kind = HTTP_CODES.get(exc.status_code)
    if kind is not None:
        return kind(str(exc.detail))
    generic = TeachercacheError(str(exc.detail))
    generic.status_code, generic.code = exc.status_code, "http_error"
    return generic


def install(app: FastAPI) -> None:
    @app.exception_handler(TeachercacheError)
    async def known(_: Request, exc: TeachercacheError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = from_http_exception(exc)
        response = render(error)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return render(validation_failed(exc))

    @app.exception_handler(sa.exc.DBAPIError)
    async def database(_: Request, exc: sa.exc.DBAPIError) -> JSONResponse:
        if is_transient(exc):
            return render(Unavailable("the database is unavailable; retry shortly"))
        raise exc
