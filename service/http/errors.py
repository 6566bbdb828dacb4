"""One renderer for every error: `{"error": {"code", "message", ...}}` with its status."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db import is_transient
from service.errors import MethodNotAllowed, NotFound, TeachercacheError, Unavailable, ValidationFailed

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # request_index, errors, limit, ... where they apply

    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """What every 4xx and 5xx carries."""

    error: ErrorDetail


# Documented on every operation, so the OpenAPI schema says what the app does.
class VllmErrorDetail(BaseModel):
    """vLLM's server's error shape, which the synchronous endpoints (service/online) answer."""

    message: str
    type: str
    param: str | None = None
    code: int


class VllmErrorBody(BaseModel):
    error: VllmErrorDetail


# The synchronous OpenAI/vLLM endpoints answer bad input in vLLM's shape; a missing key is the
# service's own 401.
ONLINE_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": VllmErrorBody | ErrorBody, "description": "Refused, in vLLM's error shape (401: the service's)"},
    "5XX": {"model": VllmErrorBody | ErrorBody, "description": "The server could not answer"},
}

RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "The request was refused; `error.field` names what was wrong"},
    "5XX": {"model": ErrorBody, "description": "The server could not answer (503: retry after Retry-After)"},
}


def location(loc: tuple[int | str, ...]) -> str:
    """('body', 'requests', 3, 'prompt') -> 'requests[3].prompt'."""
    text = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "body"


def validation_failed(exc: RequestValidationError) -> TeachercacheError:
    malformed_ids = [e for e in exc.errors() if tuple(e.get("loc", ()))[:1] == ("path",)]
    if malformed_ids:  # names nothing that exists: the same 404 as an unknown id, without echoing it
        field = location(tuple(malformed_ids[0]["loc"]))
        return NotFound(f"{field}: no such id", field=field)
    first = exc.errors()[0]
    where = location(tuple(first.get("loc", ())))
    details: dict[str, Any] = {"field": where, "errors": [{"field": location(tuple(e.get("loc", ()))), "message": e.get("msg")}
                                          for e in exc.errors()[:20]]}
    loc = first.get("loc", ())
    if len(loc) > 2 and loc[1] == "requests" and isinstance(loc[2], int):
        details["request_index"] = loc[2]
    return ValidationFailed(f"{where}: {first.get('msg')}", **details)


def render(exc: TeachercacheError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)


# Starlette's own errors (no such route, wrong method, a body over the limit) in the same shape.
HTTP_CODES = {404: NotFound, 405: MethodNotAllowed}


def from_http_exception(exc: StarletteHTTPException) -> TeachercacheError:
    error = getattr(exc, "error", None)  # BodyTooLarge carries the PayloadTooLarge it stands for
    if isinstance(error, TeachercacheError):
        return error
    kind = HTTP_CODES.get(exc.status_code)
    if kind is not None:
        return kind(str(exc.detail))
    generic = TeachercacheError(str(exc.detail))
    generic.status_code, generic.code = exc.status_code, "http_error"
    return generic


def internal_error() -> TeachercacheError:
    """What a caller sees of a bug: nothing of the exception (it may name storage paths)."""
    return TeachercacheError("internal error; the server log has the details")


def respond(request: Request, exc: TeachercacheError) -> Response:
    """JSON for the API; a page (or the login form) for the status page's own paths."""
    from service.http.ui_pages import is_ui, ui_error

    return ui_error(request, exc) if is_ui(request) else render(exc)


def install(app: FastAPI) -> None:
    @app.exception_handler(TeachercacheError)
    async def known(request: Request, exc: TeachercacheError) -> Response:
        return respond(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException) -> Response:
        response = respond(request, from_http_exception(exc))
        response.headers.update(exc.headers or {})  # Allow, on a 405
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return respond(request, validation_failed(exc))

    @app.exception_handler(sa.exc.DBAPIError)
    async def database(_: Request, exc: sa.exc.DBAPIError) -> JSONResponse:
        if is_transient(exc):
            return render(Unavailable("the database is unavailable; retry shortly"))
        raise exc

    @app.exception_handler(sa.exc.TimeoutError)  # no pooled connection within db_pool_timeout_s
    async def pool_exhausted(_: Request, exc: sa.exc.TimeoutError) -> JSONResponse:
        log.warning("database connection pool exhausted: %s", exc)
        return render(Unavailable("the server is busy (no database connection free); retry shortly"))

    @app.exception_handler(Exception)  # Starlette logs it and re-raises after this answer
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return render(internal_error())
