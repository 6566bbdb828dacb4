"""Refuse request bodies over `max_body_bytes` with 413, before the app reads them whole.

A declared Content-Length over the limit is refused before a byte of the body is read; a
chunked body is counted as it arrives and refused once it passes the limit.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import LimitExceeded
from service.http.errors import render


def too_large(limit: int) -> LimitExceeded:
    return LimitExceeded(f"body: the request body is larger than {limit} bytes (limit max_body_bytes = {limit})",
                         limit="max_body_bytes", maximum=limit, status_code=413, field="body")


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI passes HTTPExceptions from body reading through unchanged."""

    def __init__(self, error: LimitExceeded) -> None:
        super().__init__(status_code=413, detail=error.message)
        self.error = error


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await render(too_large(self.limit))(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(too_large(self.limit))
            return message

        return counted
