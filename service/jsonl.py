"""Reading an uploaded JSONL file a chunk at a time: one definition of what its lines are.

Both file parsers use it: the OpenAI batch input (service/openai_batch/input_file.py) and a
native job's input file (service/jobs/input_file.py). Lines are split on b"\\n" only
(str.splitlines would also split inside valid JSON strings at U+2028, U+0085 and other
separators) and a Windows "\\r" is dropped. The file is never held whole: memory is one chunk
plus the longest line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

CHUNK_BYTES = 1024 * 1024


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class LineTooLong(ValueError):
    def __init__(self, number: int, limit: int) -> None:
        super().__init__(f"line {number} is longer than {limit} bytes")
        self.number, self.limit = number, limit


def raw_lines(source: Readable, max_line_bytes: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Every line of `source` as bytes, "\\n" and a trailing "\\r" removed: the same lines as
    `data.split(b"\\n")` (an empty last one after a final newline included), streamed.
    A line over `max_line_bytes` raises LineTooLong, so one endless line cannot fill memory."""
    pending: list[bytes] = []  # the start of a line that continues in the next chunk
    pending_bytes = 0
    number = 0
    while chunk := source.read(chunk_bytes):
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            number += 1
            piece = chunk[start:end]
            if pending:
                piece, pending, pending_bytes = b"".join((*pending, piece)), [], 0
            if max_line_bytes is not None and len(piece) > max_line_bytes:
                raise LineTooLong(number, max_line_bytes)
            yield piece.removesuffix(b"\r")
            start = end + 1
        if start < len(chunk):
            pending.append(chunk[start:])
            pending_bytes += len(chunk) - start
            if max_line_bytes is not None and pending_bytes > max_line_bytes:
                raise LineTooLong(number + 1, max_line_bytes)
    yield b"".join(pending).removesuffix(b"\r")


def text_lines(source: Readable, max_line_bytes: int | None = None) -> Iterator[str]:
    """raw_lines decoded as UTF-8, an invalid byte replaced (U+FFFD) rather than refused."""
    for line in raw_lines(source, max_line_bytes):
        yield line.decode("utf-8", errors="replace")
