"""Submitting a JSONL file of any size: check it line by line, then send it without holding it.

A file over UPLOAD_ABOVE_BYTES is uploaded (``POST /v1/files``, streamed from disk by httpx)
and the job names it (``input_file_id``): the server reads it as a stream, at any size. A
smaller one is sent as the job body itself, built as an iterator of bytes,
``{<envelope fields>,"requests":[`` + line + ``,`` + line ... + ``]}``, so the file is never
held in memory, neither here nor in httpx.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from teachercache.errors import ValidationError

# Large enough that a million-line file is not a million tiny chunks on the wire.
CHUNK_BYTES = 256 * 1024
# Above this a file is uploaded rather than sent as one job body (which the server parses whole).
UPLOAD_ABOVE_BYTES = 8 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"


def validate_jsonl(path: str | os.PathLike[str]) -> int:
    """Check every non-blank line is a JSON object; return how many there are.

    Raises ValidationError naming the first bad line (1-based), before anything is sent.
    """
    count = 0
    for line_number, line in _numbered_lines(path):
        _check_line(path, line_number, line)
        count += 1
    if count == 0:
        raise _invalid(path, None, "contains no requests")
    return count


def is_large(path: str | os.PathLike[str]) -> bool:
    """Whether the file goes by upload (input_file_id) rather than as the job body."""
    return os.path.getsize(path) > UPLOAD_ABOVE_BYTES


def iter_submit_body(envelope: dict[str, Any], path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The JSON body ``{**envelope, "requests": [<each line>]}``, in chunks of ~CHUNK_BYTES."""
    buffer = bytearray(_envelope_head(envelope))
    separator = b""
    for _, line in _numbered_lines(path):
        buffer += separator + line
        separator = b","
        if len(buffer) >= CHUNK_BYTES:
            yield bytes(buffer)
            buffer.clear()
    yield bytes(buffer + b"]}")


async def aiter_submit_body(envelope: dict[str, Any], path: str | os.PathLike[str]) -> AsyncIterator[bytes]:
    """iter_submit_body for httpx.AsyncClient, which only streams async iterables."""
    for chunk in iter_submit_body(envelope, path):
        yield chunk


def _envelope_head(envelope: dict[str, Any]) -> bytes:
    # json.dumps of the envelope without its closing brace, then the opening of the list.
    encoded = json.dumps(envelope, separators=(",", ":"))
    comma = "," if envelope else ""
    return f'{encoded[:-1]}{comma}"requests":['.encode()


def _numbered_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, stripped line) for every non-blank line, read one at a time."""
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            line = raw.strip()
            if line_number == 1 and line.startswith(_BOM):
                line = line[len(_BOM) :].strip()
            if line:
                yield line_number, line


def _check_line(path: str | os.PathLike[str], line_number: int, line: bytes) -> None:
    try:
        value = json.loads(line)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise _invalid(path, line_number, f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _invalid(path, line_number, f"is a JSON {type(value).__name__}, not an object")


def _invalid(path: str | os.PathLike[str], line_number: int | None, problem: str) -> ValidationError:
    where = f"{os.fspath(path)}, line {line_number}" if line_number else os.fspath(path)
    error = ValidationError(None, "invalid_jsonl", f"{where} {problem}")
    error.line_number = line_number
    return error
