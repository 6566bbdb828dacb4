"""Range requests on shard downloads and file contents, as RFC 9110 §14 and §15.3.7 say.

The parser is unit-tested first; then a real indexed shard is fetched through the app.
Behaviour chosen where the RFC leaves a choice (documented in service/http/ranges.py and
docs/http.md): an invalid Range header is ignored (200, whole file); several ranges are
coalesced, then sent as multipart/byteranges; more than 100 ranges are ignored (200).
"""

from __future__ import annotations

import time

import pytest

from service.errors import RangeNotSatisfiable
from service.http.ranges import MAX_RANGES, ByteRange, parse_range_header
from tests.shards import add_job_shard
from tests.s3 import local_or_s3_uri

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


# Every download test runs on both adapters: a local file, and an S3 object proxied through
# the API (ranges as ranged reads of the object).
@pytest.fixture(params=["local", "s3"])
def storage_uri(request) -> str | None:
    return local_or_s3_uri(request)


@pytest.fixture
def storage_download() -> str:
    return "proxy"


@pytest.fixture
def shard(api, rt):
    return add_job_shard(api, rt)


def multipart_parts(response) -> list[tuple[str, bytes]]:
    """(Content-Range, body) of each part of a multipart/byteranges response."""
    boundary = response.headers["content-type"].split("boundary=")[1].encode()
    assert response.content.endswith(b"--" + boundary + b"--")
    parts = []
    for part in response.content.split(b"--" + boundary)[1:-1]:
        head, _, body = part.partition(b"\r\n\r\n")
        assert body.endswith(b"\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        parts.append((headers["Content-Range"], body[:-2]))
    return parts


def test_full_download_sends_validators_and_accepts_ranges(api, shard):
    response = api.get(shard.url)
    assert response.status_code == 200 and response.content == shard.content
    assert response.headers["etag"] == shard.etag
    assert response.headers["accept-ranges"] == "bytes"
    assert int(response.headers["content-length"]) == len(shard.content)


@pytest.mark.parametrize(
    "header, start, stop",
    [("bytes=10-99", 10, 100), ("bytes=-100", -100, None), ("bytes=100-", 100, None), ("bytes=0-99999999", 0, None),
     ("bytes=0-9,5-19", 0, 20), ("bytes=0-9,99999999-", 0, 10)],
)
def test_a_single_range_is_a_206_with_content_range(api, shard, header, start, stop):
    size = len(shard.content)
    expected = shard.content[start:stop]
    first = start % size
    response = api.get(shard.url, headers={"Range": header})
    assert response.status_code == 206, response.text
    assert response.content == expected
    assert response.headers["content-range"] == f"bytes {first}-{first + len(expected) - 1}/{size}"
    assert int(response.headers["content-length"]) == len(expected)
    assert response.headers["etag"] == shard.etag


def test_several_ranges_are_multipart_byteranges(api, shard):
    size = len(shard.content)
    response = api.get(shard.url, headers={"Range": "bytes=-10,0-9,20-29"})
    assert response.status_code == 206
    assert response.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert int(response.headers["content-length"]) == len(response.content)
    assert multipart_parts(response) == [
        (f"bytes 0-9/{size}", shard.content[0:10]),
        (f"bytes 20-29/{size}", shard.content[20:30]),
        (f"bytes {size - 10}-{size - 1}/{size}", shard.content[-10:]),
    ]


@pytest.mark.parametrize("header", ["bytes=99999999-", "bytes=-0", "bytes=99999999-,88888888-99999999"])
def test_unsatisfiable_range_is_416_with_the_length(api, shard, header):
    response = api.get(shard.url, headers={"Range": header})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(shard.content)}"
    assert response.json()["error"]["code"] == "range_not_satisfiable"


@pytest.mark.parametrize("header", ["items=0-5", "bytes=abc", "bytes=5-3", "bytes=0-5,x", "bytes=1_0-20", "bytes 0-5"])
def test_an_invalid_range_header_is_ignored(api, shard, header):
    response = api.get(shard.url, headers={"Range": header})
    assert response.status_code == 200 and response.content == shard.content


@pytest.mark.parametrize(
    "header",
    [
        "bytes=" + ",".join(f"{i}-{i}" for i in range(5000)),  # thousands of tiny ranges
        "bytes=" + ",".join("0-" for _ in range(5000)),  # thousands of overlapping ones
        "bytes=" + ",".join(f"{i}-" for i in range(5000, 0, -1)),  # descending, overlapping
    ],
)
def test_thousands_of_ranges_get_the_whole_file_quickly(api, shard, header):
    started = time.monotonic()
    response = api.get(shard.url, headers={"Range": header})
    assert response.status_code == 200 and response.content == shard.content
    assert time.monotonic() - started < 5  # generous on a loaded 2-core machine; it takes milliseconds


def test_if_range_with_the_etag_honours_the_range(api, shard):
    response = api.get(shard.url, headers={"Range": "bytes=0-9", "If-Range": shard.etag})
    assert response.status_code == 206 and response.content == shard.content[:10]


@pytest.mark.parametrize("validator", ['"0000"', "W/{etag}", "{bare}", "Mon, 01 Jan 2001 00:00:00 GMT"])
def test_if_range_that_does_not_match_strongly_gets_the_whole_file(api, shard, validator):
    if_range = validator.format(etag=shard.etag, bare=shard.sha256)
    response = api.get(shard.url, headers={"Range": "bytes=0-9", "If-Range": if_range})
    assert response.status_code == 200 and response.content == shard.content


def test_if_range_mismatch_wins_over_an_unsatisfiable_range(api, shard):
    response = api.get(shard.url, headers={"Range": "bytes=99999999-", "If-Range": '"other"'})
    assert response.status_code == 200 and response.content == shard.content


@pytest.mark.parametrize("headers, status", [({}, 200), ({"Range": "bytes=10-99"}, 206),
                                             ({"Range": "bytes=0-9,20-29"}, 206)])
def test_head_answers_the_get_headers_without_a_body(api, shard, headers, status):
    got, head = api.get(shard.url, headers=headers), api.head(shard.url, headers=headers)
    assert head.status_code == got.status_code == status
    assert head.content == b""
    for name in ("etag", "accept-ranges", "content-length", "last-modified", "content-disposition"):
        assert head.headers.get(name) == got.headers.get(name), name
    assert head.headers.get("content-range") == got.headers.get("content-range")
    assert head.headers["content-type"].split(";")[0] == got.headers["content-type"].split(";")[0]


def test_file_content_honours_ranges(api):
    data = b"".join(b'{"line": %d}\n' % i for i in range(200))
    file_id = api.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}).json()["id"]
    url = f"/v1/files/{file_id}/content"
    whole = api.get(url)
    assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"
    part = api.get(url, headers={"Range": "bytes=5-14", "If-Range": whole.headers["etag"]})
    assert part.status_code == 206 and part.content == data[5:15]
    assert part.headers["content-range"] == f"bytes 5-14/{len(data)}"
    assert api.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
