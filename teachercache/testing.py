"""Test helpers: drive an ASGI app (the service, or a double of it) with the blocking Client.

httpx ships ``ASGITransport`` for ``AsyncClient`` only. :class:`SyncASGITransport` runs
it on an event loop in a background thread, so ``Client(transport=SyncASGITransport(app))``
talks to the app in process, with no socket and no server to start.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import httpx


class SyncASGITransport(httpx.BaseTransport):
    """A blocking httpx transport over an ASGI app.

    Request bodies are streamed to the app chunk by chunk, as over a socket. Like a real
    connection, a response body shorter than its ``Content-Length`` ends with
    ``httpx.RemoteProtocolError`` (so an app can imitate a dropped connection by sending
    a truncated body). The loop is started once per process, so the transport keeps
    working in forked DataLoader workers.
    """

    def __init__(self, app: Any, **asgi_options: Any) -> None:
        self._asgi = httpx.ASGITransport(app, **asgi_options)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_pid: int | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        forwarded = httpx.Request(
            request.method, request.url, headers=request.headers, stream=_AsyncOverSync(request.stream)
        )
        return self._run(self._forward(forwarded))

    def close(self) -> None:
        with self._lock:
            if self._loop is not None and self._loop_pid == os.getpid():
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop, self._loop_pid = None, None

    async def _forward(self, request: httpx.Request) -> httpx.Response:
        response = await self._asgi.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)  # an ASGI transport's always is
        body = b"".join([chunk async for chunk in response.stream])
        expected = _declared_length(response, request.method)
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_ReceivedBody(body, expected)
        )

    def _run(self, coroutine: Coroutine[Any, Any, httpx.Response]) -> httpx.Response:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop_of_this_process()).result()

    def _loop_of_this_process(self) -> asyncio.AbstractEventLoop:
        # Threads do not survive fork: a child starts its own loop on first use.
        with self._lock:
            if self._loop is None or self._loop_pid != os.getpid():
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="asgi-transport", daemon=True).start()
                self._loop_pid = os.getpid()
            return self._loop


def _declared_length(response: httpx.Response, method: str) -> int | None:
    length = response.headers.get("content-length")
    return int(length) if length is not None and method != "HEAD" else None


class _AsyncOverSync(httpx.AsyncByteStream):
    """The blocking client's request body, as ASGITransport wants it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._stream:
            yield chunk


class _ReceivedBody(httpx.SyncByteStream):
    """The body as a socket would deliver it: cut short means the peer hung up."""

    def __init__(self, body: bytes, expected: int | None) -> None:
        self._body = body
        self._expected = expected

    def __iter__(self) -> Iterator[bytes]:
        yield self._body
        if self._expected is not None and len(self._body) < self._expected:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body: "
                f"received {len(self._body)} bytes, expected {self._expected}"
            )
