"""Range requests on shard downloads and file contents, as RFC 9110 §14 and §15.3.7 say.

A real indexed shard is fetched through the app (the parser alone: tests/unit/test_ranges.py).
Behaviour chosen where the RFC leaves a choice (documented in service/http/ranges.py and
docs/http.md): an invalid Range header is ignored (200, whole file); several ranges are
coalesced, then sent as multipart/byteranges; more than 100 ranges are ignored (200).
"""

from __future__ import annotations

import time

import pytest

from tests.s3 import local_or_s3_uri
from tests.shards import add_job_shard


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
