"""Refuse request bodies over their route's limit with 413, before the app reads them whole.

Each route has its own limit: a file upload (`max_upload_bytes`: OpenAI batch input files may
be 200 MB) is allowed far more than a JSON body (`max_body_bytes`), which is parsed whole in
memory. A declared Content-Length over the limit is refused before a byte of the body is
read; a chunked body is counted as it arrives and refused once it passes the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge
from service.http.errors import render
from service.settings import ServiceSettings


@dataclass(frozen=True)
class BodyLimits:
    default: tuple[str, int]  # (setting name, bytes) of every route not in per_path
    per_path: dict[str, tuple[str, int]]  # exact path -> (setting name, bytes)


def body_limits(settings: ServiceSettings) -> BodyLimits:
    return BodyLimits(default=("max_request_body_bytes", settings.max_request_body_bytes), per_path={
        "/v1/jobs": ("max_body_bytes", settings.max_body_bytes),
        "/v1/files": ("max_upload_bytes", settings.max_upload_bytes),
    })


def too_large(name: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"body: the request body is larger than {limit} bytes (limit {name} = {limit})",
                           limit=name, maximum=limit, field="body")


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI passes HTTPExceptions from body reading through unchanged."""

    def __init__(self, error: PayloadTooLarge) -> None:
        super().__init__(status_code=413, detail=error.message)
        self.error = error


class BodySizeLimit:
    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.default = limits.default
        self.per_path = limits.per_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name, limit = self.per_path.get(scope["path"], self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await render(too_large(name, limit))(scope, receive, send)
            return
        await self.app(scope, self._counting(receive, name, limit), send)

    def _counting(self, receive: Receive, name: str, limit: int) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(too_large(name, limit))
            return message

        return counted
