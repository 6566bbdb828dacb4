"""The Range header parser, as RFC 9110 §14 says (the downloads that use it are tested in
tests/integration/test_http_ranges.py). Behaviour chosen where the RFC leaves a choice
(documented in service/http/ranges.py and docs/http.md): an invalid Range header is ignored;
several ranges are coalesced; more than 100 ranges are ignored."""

from __future__ import annotations

import pytest

from service.errors import RangeNotSatisfiable
from service.http.ranges import MAX_RANGES, ByteRange, parse_range_header

SIZE = 1000

# ---- the parser -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, expected",
    [
        ("bytes=0-499", [(0, 500)]),
        ("bytes=500-999", [(500, 1000)]),
        ("bytes=500-", [(500, 1000)]),
        ("bytes=-200", [(800, 1000)]),
        ("bytes=-5000", [(0, 1000)]),  # a suffix longer than the file is the whole file
        ("bytes=900-5000", [(900, 1000)]),  # a last-pos past the end stops at the end
        ("bytes=0-0", [(0, 1)]),
        ("BYTES = 1-2", [(1, 3)]),  # the unit is case-insensitive; whitespace around "=" tolerated
        ("bytes=0-1, 4-5", [(0, 2), (4, 6)]),
        ("bytes=0-1,,4-5,", [(0, 2), (4, 6)]),  # empty list elements are allowed by the #rule
        ("bytes=4-5,0-1", [(0, 2), (4, 6)]),  # sorted
        ("bytes=0-9,5-19", [(0, 20)]),  # overlapping: coalesced
        ("bytes=0-9,10-19", [(0, 20)]),  # adjacent: coalesced
        ("bytes=0-1,999999-", [(0, 2)]),  # an unsatisfiable member is left out, not a 416
        ("bytes=0-1,-0", [(0, 2)]),
        ("bytes=0-" + "9" * 5000, [(0, 1000)]),  # a huge last-pos: bounded, not a slow int()
    ],
)
def test_satisfiable_ranges(header, expected):
    assert parse_range_header(header, SIZE) == [ByteRange(*r) for r in expected]


@pytest.mark.parametrize(
    "header",
    [
        "items=0-5",  # a unit we do not understand MUST be ignored
        "bytes",
        "bytes=",
        "bytes=,",
        "bytes=-",
        "bytes=abc",
        "bytes=5-3",  # last-pos before first-pos: invalid
        "bytes=1_0-20",  # int() would read 10
        "bytes=+5-10",
        "bytes=٥-10",  # an Arabic-Indic five: not a DIGIT
        "bytes=--5",
        "bytes=0-5,x",  # one invalid member makes the whole header invalid
        "bytes 0-5",
        "bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES + 1)),  # too many: ignored
    ],
)
def test_invalid_headers_are_ignored(header):
    assert parse_range_header(header, SIZE) is None


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0", "bytes=5000-,1000-1001",
                                    "bytes=" + "9" * 5000 + "-"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(RangeNotSatisfiable) as raised:
        parse_range_header(header, SIZE)
    assert raised.value.headers == {"Content-Range": "bytes */1000"}


def test_an_empty_file_satisfies_no_range():
    for header in ("bytes=0-", "bytes=-1"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range_header(header, 0)


def test_a_hundred_ranges_are_served():
    header = "bytes=" + ",".join(f"{2 * i}-{2 * i}" for i in range(MAX_RANGES))
    assert len(parse_range_header(header, SIZE)) == MAX_RANGES


# ---- against a real shard -----------------------------------------------------------------
