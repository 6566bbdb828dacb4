"""Reading uploaded JSONL files in chunks (service/jsonl.py) and a file job's line bookkeeping."""

from __future__ import annotations

import io
import random
import threading

import pytest

from service.jobs.input_file import LineNumbers, read_ahead
from service.jsonl import LineTooLong, raw_lines, text_lines

PIECES = [b"a", b"\n", b"\r", b"\r\n", b"\xff", b"\xe2\x80\xa8", b"\xc3", b"{}", b"\xe2\x80"]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 1 << 20])
def test_lines_are_the_lines_of_splitting_the_whole_file(chunk_bytes):
    rng = random.Random(chunk_bytes)
    for _ in range(2000):
        data = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(30)))
        whole = [line.removesuffix("\r") for line in data.decode("utf-8", errors="replace").split("\n")]
        got = [line.decode("utf-8", errors="replace") for line in raw_lines(io.BytesIO(data), chunk_bytes=chunk_bytes)]
        assert got == whole, data


def test_text_lines_keep_unicode_separators_inside_a_line():
    assert list(text_lines(io.BytesIO('{"a": "x\u2028y"}\r\n'.encode()))) == ['{"a": "x\u2028y"}', ""]


@pytest.mark.parametrize("data, line", [(b"ok\n" + b"x" * 100 + b"\nok", 2), (b"ok\nok\n" + b"x" * 100, 3)])
def test_a_line_over_the_limit_is_refused_with_its_number(data, line):
    with pytest.raises(LineTooLong) as refused:
        list(raw_lines(io.BytesIO(data), max_line_bytes=50, chunk_bytes=8))
    assert refused.value.number == line


def test_line_numbers_count_the_blank_lines_skipped():
    numbers = LineNumbers()
    # lines: 1 blank, 2 blank, 3 = request 0, 4 = request 1, 5 blank, 6 = request 2
    numbers.skipped(0, 1)
    numbers.skipped(0, 2)
    numbers.skipped(2, 3)
    assert [numbers.of(i) for i in range(3)] == [3, 4, 6]
    assert LineNumbers().of(41) == 42


def test_read_ahead_yields_everything_in_order_and_raises_the_producer_s_error_in_place():
    def items():
        yield from range(5)
        raise ValueError("line 6: bad")

    seen = []
    with pytest.raises(ValueError, match="line 6"):
        for item in read_ahead(items(), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_a_consumer_that_stops_early_stops_the_producer():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    ahead = read_ahead(items(), depth=2)
    assert next(ahead) == 0
    ahead.close()
    assert len(produced) <= 5
    assert not [t for t in threading.enumerate() if t.name == "jsonl-read-ahead"]
