"""Byte-range requests (RFC 9110 §14) for file downloads.

Starlette's FileResponse already streams a single range (206 + Content-Range), several ranges
as `multipart/byteranges`, answers HEAD with the headers only, sends `Accept-Ranges: bytes`,
and honours `If-Range` (a strong compare against the ETag; a weak validator never matches).
What its parser (Starlette 1.x) gets wrong, and `parse_range_header` does instead:

- a Range header it cannot parse, or in a unit other than bytes, gets 400; RFC 9110 says an
  unknown unit MUST be ignored and an invalid header MAY be: we ignore both (200, whole file);
- one unsatisfiable range in a set makes it answer 416; RFC 9110 says a set is satisfiable
  when any of its ranges is, and the others are left out: we send the satisfiable ones;
- it accepts what `int()` accepts (`1_0`, `+5`, non-ASCII digits); we take ASCII digits only,
  and bound how many digits are read (a 10,000-digit position is simply past the end);
- its 416 is an empty text/plain body; ours is the service's JSON error (with `bytes */size`).

Several ranges are sorted and coalesced (overlapping or adjacent ones merged, as RFC 9110
§14.2 allows); one range left is a plain 206, more are `multipart/byteranges`. A header with
more than MAX_RANGES ranges is ignored (200, whole file): parsing stays bounded and a client
asking for thousands of tiny ranges gets the file in one piece (RFC 9110 §17.15).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, BinaryIO, NamedTuple

import anyio
from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send

from service.errors import RangeNotSatisfiable

MAX_RANGES = 100
MAX_DIGITS = 18  # anything longer is past the end of any file we serve (and int() stays cheap)
RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")


class ByteRange(NamedTuple):
    start: int
    end: int  # exclusive, as Starlette's FileResponse takes it


class InvalidRange(ValueError):
    """The header is not a valid ranges-specifier: it is ignored, never an error."""


def position(digits: str) -> int:
    return int(digits) if len(digits) <= MAX_DIGITS else 10**MAX_DIGITS


def parse_range_header(header: str, size: int) -> list[ByteRange] | None:
    """The ranges of `size` bytes to send, sorted and coalesced; None: ignore the header.

    Raises RangeNotSatisfiable when no range overlaps the file.
    """
    unit, equals, specifier = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    parts = [part.strip() for part in specifier.split(",")]
    parts = [part for part in parts if part]  # "#" lists may have empty elements
    if not parts or len(parts) > MAX_RANGES:
        return None
    try:
        requested = [parse_range_spec(part, size) for part in parts]
    except InvalidRange:
        return None
    satisfiable = [r for r in requested if r is not None]
    if not satisfiable:
        raise RangeNotSatisfiable(size)
    return coalesce(satisfiable)


def parse_range_spec(part: str, size: int) -> ByteRange | None:
    """`first-last`, `first-` or `-suffix`; None when it does not overlap the file."""
    match = RANGE_SPEC.fullmatch(part)
    if match is None or match.group(0) == "-":
        raise InvalidRange(part)
    first, last = match.groups()
    if not first:  # the last `suffix` bytes; a zero-length suffix is unsatisfiable
        suffix = position(last)
        return ByteRange(max(size - suffix, 0), size) if suffix > 0 and size > 0 else None
    start = position(first)
    if last and position(last) < start:
        raise InvalidRange(part)
    if start >= size:
        return None
    return ByteRange(start, min(position(last) + 1, size) if last else size)


def coalesce(ranges: list[ByteRange]) -> list[ByteRange]:
    merged: list[ByteRange] = []
    for current in sorted(ranges):
        if merged and current.start <= merged[-1].end:
            merged[-1] = ByteRange(merged[-1].start, max(merged[-1].end, current.end))
        else:
            merged.append(current)
    return merged


class RangeFileResponse(FileResponse):
    """Starlette's FileResponse with the RFC 9110 range parser above."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        # An empty list makes FileResponse send the whole file with 200.
        return list(parse_range_header(http_range, file_size) or [])


# Read by RangeFileResponse from the request itself; declared so the OpenAPI schema shows them.
RANGE_HEADERS = {"parameters": [
    {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "bytes=first-last, first-, -suffix; up to 100 ranges (more: the whole file)"},
    {"name": "If-Range", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "the ETag; the Range is honoured only if it still matches"},
]}


def file_responses(media_type: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of a route answered by RangeFileResponse."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        200: {"description": "the whole file", "content": {media_type: binary}},
        206: {"description": "the requested range; several ranges as multipart/byteranges",
              "content": {media_type: binary, "multipart/byteranges": binary}},
        416: {"description": "no requested range overlaps the file (Content-Range: bytes */<size>)"},
    }


class StoredFileResponse(RangeFileResponse):
    """RangeFileResponse over an object in any storage adapter (proxying an object store).

    Starlette reads the file only through `_open_file` (seek + read) and its size through
    `stat_result`, so one random-access reader of the port stands in for a path: a range is a
    ranged read of the object, never a whole download.
    """

    # Each read of an object-store file is one ranged GET: Starlette's 64 KiB reads would be a
    # request per 64 KiB (a few MiB/s); 8 MiB per GET keeps a proxied download near the store's speed.
    chunk_size = 8 * 1024 * 1024

    def __init__(self, opener: Callable[[], BinaryIO], size: int, **kwargs: Any) -> None:
        self._opener = opener
        stat_result = os.stat_result((0o100644, 0, 0, 1, 0, 0, size, 0, 0, 0))
        super().__init__(path="stored-object", stat_result=stat_result, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # There is no local path to hand the server (the pathsend extension).
        extensions = {k: v for k, v in scope.get("extensions", {}).items() if k != "http.response.pathsend"}
        await super().__call__({**scope, "extensions": extensions}, receive, send)

    # Starlette types the file as anyio's AsyncFile; it calls only seek and read, which AsyncReader has.
    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[AsyncReader]:  # type: ignore[override]
        file = await anyio.to_thread.run_sync(self._opener)
        try:
            yield AsyncReader(file)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(file.close)


class AsyncReader:
    """The two calls Starlette makes on a file, off the event loop."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file

    async def seek(self, offset: int) -> None:
        await anyio.to_thread.run_sync(self.file.seek, offset)

    async def read(self, size: int) -> bytes:
        return await anyio.to_thread.run_sync(self.file.read, size)
