"""Authenticate a request that carries a body from its headers, before any byte of the body is read.

FastAPI reads and parses a JSON body (or spools a multipart upload to disk) before any
dependency runs, so without this layer an unauthenticated caller could make the server read
and parse hundreds of megabytes before its 401. Here the key is checked first (in a worker
thread: the lookup is a database query), a bad key is answered 401 without reading the body,
and the caller found is left in the request state for the `caller` dependency to reuse.
Requests without a body are left to the routes' own dependency, so an unknown path stays a 404.
"""

from __future__ import annotations

from anyio import to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Unauthenticated
from service.http.errors import render
from service.runtime import Runtime
from service.tenants.service import Caller, TenantService

# The status page's login form posts the key in its body (and logout only clears the cookie).
OPEN_PATHS = ("/healthz", "/health", "/ui/login", "/ui/logout")  # /health: vLLM's, for trainers


def has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length")
    return b"transfer-encoding" in headers or (length is not None and length.strip() not in (b"", b"0"))


def bearer_token(headers: dict[bytes, bytes]) -> str | None:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authenticate(rt: Runtime, token: str | None) -> Caller:
    if token is None:
        raise Unauthenticated("an API key is required: send 'Authorization: Bearer <key>'")
    with rt.sessions() as db:
        found = TenantService(db).authenticate(token)
    if found is None:
        raise Unauthenticated("the API key is not valid (unknown, malformed or revoked)")
    return found


class AuthenticateFirst:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or not has_body(headers):
            await self.app(scope, receive, send)
            return
        try:
            found = await to_thread.run_sync(authenticate, self.rt, bearer_token(headers))
        except Unauthenticated as exc:
            await render(exc)(scope, receive, send)  # the body is never read
            return
        scope.setdefault("state", {})["caller"] = found
        await self.app(scope, receive, send)
