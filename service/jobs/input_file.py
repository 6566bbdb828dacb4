"""A job's requests read from an uploaded JSONL file, one request object per line, as a stream.

Each line is the object a body gives as `requests[i]`. The file is read, validated and
tokenized a batch at a time (service/jsonl.py reads its lines), so a file of 10^7 requests
costs the memory of one batch. A refusal names the line: `line N: requests[i].field: ...`
(with `line` and `request_index` in the error), as a body's names `requests[i]`.
"""

from __future__ import annotations

import bisect
import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any, TypeVar

from pydantic import ValidationError

from service.errors import ValidationFailed
from service.jobs.limits import (
    JobLimits,
    check_request_count,
    check_token_total,
    request_checks,
    request_tokens,
)
from service.jobs.schemas import JobCreate, RequestIn
from service.jobs.tokenize import Prepared, prepare_one
from service.jsonl import LineTooLong, Readable, raw_lines
from service.teachers.tokenizer import Teacher

BATCH_REQUESTS = 5000  # requests validated, looked up and inserted together
READ_AHEAD_BATCHES = 2  # parsed while the database writes the one before: the memory of a few batches
T = TypeVar("T")
_BOM = b"\xef\xbb\xbf"


class LineNumbers:
    """The file line (1-based) of each request, from the blank lines skipped: a list as long as
    the number of blank lines, not of requests."""

    def __init__(self) -> None:
        self._first_index: list[int] = []  # request index after each run of blank lines...
        self._skipped: list[int] = []  # ...and how many lines were skipped up to there

    def skipped(self, index: int, total_skipped: int) -> None:
        if self._first_index and self._first_index[-1] == index:
            self._skipped[-1] = total_skipped
        else:
            self._first_index.append(index)
            self._skipped.append(total_skipped)

    def of(self, index: int) -> int:
        position = bisect.bisect_right(self._first_index, index) - 1
        return index + 1 + (self._skipped[position] if position >= 0 else 0)


def file_lines(source: Readable, limits: JobLimits, numbers: LineNumbers) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every non-blank line; a UTF-8 byte order mark on the first is dropped."""
    skipped = 0
    index = 0
    try:
        for number, line in enumerate(raw_lines(source, max_line_bytes(limits)), start=1):
            if number == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                skipped += 1
                numbers.skipped(index, skipped)
                continue
            yield number, line
            index += 1
    except LineTooLong as exc:
        raise ValidationFailed(f"line {exc.number}: longer than {exc.limit} bytes", line=exc.number,
                               field="input_file_id") from None


def max_line_bytes(limits: JobLimits) -> int:
    # A request's texts are each at most max_text_chars; JSON escapes may take 6 bytes a character.
    return 64 * 1024 * 1024 + 6 * limits.max_text_chars


def parse_line(index: int, line: bytes) -> RequestIn:
    try:
        return RequestIn.model_validate_json(line)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"].startswith("json"):
            message = first["msg"].replace(" at line 1 column ", " at column ")  # the line is named already
            raise ValidationFailed(f"not a JSON request object: {message}", request_index=index,
                                   field=f"requests[{index}]") from None
        where = f"requests[{index}]" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        raise ValidationFailed(f"{where}: {first['msg']}", request_index=index, field=where) from None


def on_line(exc: ValidationFailed, number: int) -> None:
    """A request's refusal, prefixed with its file line."""
    exc.message = f"line {number}: {exc.message}"
    exc.args = (exc.message,)
    exc.details["line"] = number


def prepared_batches(body: JobCreate, teacher: Teacher, lines: Iterator[tuple[int, bytes]],
                     limits: JobLimits) -> Iterator[list[Prepared]]:
    """The file's requests, validated and tokenized, BATCH_REQUESTS at a time; the job's request
    count and token budget are checked as they grow, so an oversized file is refused at the line
    that passes the limit."""
    batch: list[Prepared] = []
    index = tokens = 0
    check = request_checks(body, limits)  # as a body's requests: texts' lengths, own parameters
    for number, line in lines:
        try:  # not a context manager per line: building one cost 1.5 µs a request
            check_request_count(index + 1, limits)
            request = parse_line(index, line)
            check(index, request)
            prepared = prepare_one(index, request, body, teacher)
            tokens += request_tokens(body, prepared)
            check_token_total(tokens, limits)
        except ValidationFailed as exc:
            on_line(exc, number)
            raise
        batch.append(prepared)
        index += 1
        if len(batch) >= BATCH_REQUESTS:
            yield batch
            batch = []
    if batch:
        yield batch
    if index == 0:
        raise ValidationFailed("input_file_id: the file has no requests", field="input_file_id")


_DONE = object()


def read_ahead(items: Iterator[T], depth: int = READ_AHEAD_BATCHES) -> Generator[T, None, None]:
    """`items`, produced in a thread up to `depth` ahead of the consumer: the file is parsed and
    tokenized while the caller's thread waits on Postgres for the batch before (the driver
    releases the GIL while it waits), instead of one after the other. An error in the producer
    is raised here, in order; a consumer that stops early stops the producer at its next item."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)  # items, then _DONE or the exception
    stopped = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stopped.is_set():
                    return
                ready.put(item)
            ready.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put(exc)

    producer = threading.Thread(target=produce, name="jsonl-read-ahead", daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        producer.join()
