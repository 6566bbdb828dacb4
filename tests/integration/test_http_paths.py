"""Path traversal and malformed ids, on every route that takes a path parameter.

The routes come from `app.routes`, so a new route is covered without editing this file.
Requests are sent as raw ASGI calls with the exact bytes a client could put on the wire
(httpx would normalise `..` away before the app saw it), and the app sees what uvicorn
passes on: the percent-decoded path. Every attempt must be a 404 `not_found` in the error
shape, and no answer may show a storage or filesystem path.
"""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import unquote

import pytest
from fastapi.routing import APIRoute

from tests.jobs import bearer
from tests.shards import add_job_shard

TRAVERSALS = [
    "..",
    ".",
    "%2e%2e",
    "../../../../etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252f%252e%252e%252fetc%252fpasswd",  # double-encoded
    "%25252e%25252e%25252f",  # triple-encoded
    "..%252f..%252fetc%252fpasswd",
    "%2fetc%2fpasswd",  # an absolute path in one segment
    "/etc/passwd",  # an absolute path as extra segments
    "..%5c..%5cwindows%5cwin.ini",
    "..\\..\\windows\\win.ini",
    "C:%5cWindows%5cwin.ini",
    "....//....//etc/passwd",
    "..;/..;/etc/passwd",
    "%c0%ae%c0%ae%c0%af",  # overlong UTF-8 dots and slash
    "%e2%80%ae",  # a right-to-left override
    "%00",
    "job_%00",
    "shd_" + "0" * 31 + "%00",
    "file:%2f%2f%2fetc%2fpasswd",
    "jobs%2fjob_" + "0" * 32 + "%2fpart-00000.parquet",  # the shape of a storage path
    "a" * 10_000,
    "%41" * 3_000,
    "job_" + "0" * 32 + "0",  # one digit too many
    "JOB_" + "0" * 32,
    "%20",
]
FORBIDDEN_IN_BODY = ["etc/passwd", "win.ini", "windows", "..", "\\", ".parquet", "part-"]


def routes_with_path_parameters(app) -> list[tuple[str, str]]:
    """(method, path template) for every route whose path has a parameter."""
    found = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route.param_convertors:
            found.extend((method, route.path) for method in sorted(route.methods))
    return found


def fill(template: str, value: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda _: value, template)


def asgi_call(app, method: str, raw_path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """One request with exactly this raw path; the scope's path is decoded as uvicorn does it."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": method, "scheme": "http", "server": ("testserver", 80), "client": ("127.0.0.1", 1234),
        "root_path": "", "path": unquote(raw_path), "raw_path": raw_path.encode("latin-1"), "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-length", b"0"),
                    *[(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]],
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode("latin-1") for k, v in start["headers"]}, body


@pytest.fixture
def stored(api, rt):
    """Something real in storage and in the index, so a traversal has something to find."""
    shard = add_job_shard(api, rt)
    file_id = api.post("/v1/files", files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "batch"}).json()["id"]
    return shard, file_id


def test_every_route_with_a_path_parameter_is_covered(app):
    paths = {path for _, path in routes_with_path_parameters(app)}
    assert {"/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/shards", "/v1/jobs/{job_id}/errors",
            "/v1/shards/{shard_id}", "/v1/files/{file_id}", "/v1/files/{file_id}/content",
            "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel"} <= paths


@pytest.mark.parametrize("storage_uri", ["local", "s3"], indirect=True)
def test_traversals_and_malformed_ids_are_not_found_on_every_route(app, rt, stored, api_key):
    shard, file_id = stored
    auth = bearer(api_key)
    assert asgi_call(app, "GET", shard.url, auth)[0] in (200, 307)  # 307: a presigned redirect on S3; the raw calls do reach the routes
    assert asgi_call(app, "GET", shard.url)[0] == 401
    assert asgi_call(app, "HEAD", f"/v1/files/{file_id}", auth)[0] == 405
    secrets = [str(rt.storage.root), str(rt.settings.state_dir)]
    failures = []
    for method, template in routes_with_path_parameters(app):
        page = template.startswith("/ui/")  # the status page: its key is a cookie, its 404 a page
        headers_sent = {"Cookie": f"teachercache_key={api_key}"} if page else auth
        for value in TRAVERSALS:
            raw = fill(template, value)
            status, headers, body = asgi_call(app, method, raw, headers_sent)
            text = body.decode("utf-8", "replace")
            problems = []
            if status != 404:
                problems.append(f"status {status}")
            if method != "HEAD" and not page and json.loads(body)["error"]["code"] != "not_found":
                problems.append(f"body {text[:200]}")
            problems += [f"body shows {s!r}" for s in secrets + FORBIDDEN_IN_BODY if s in text]
            if problems:
                failures.append(f"{method} {raw[:80]}: {', '.join(problems)}")
    assert not failures, "\n".join(failures)


def test_a_malformed_id_is_a_404_naming_the_parameter(api):
    for url, field in [("/v1/jobs/nope", "job_id"), ("/v1/shards/..%2fx", None), ("/v1/files/file-x/content", "file_id"),
                       ("/v1/batches/batch_%00", "batch_id")]:
        response = api.get(url)
        assert response.status_code == 404, url
        error = response.json()["error"]
        assert error["code"] == "not_found"
        if field:
            assert error["field"] == field


def test_well_formed_unknown_ids_are_not_found(api, stored):
    shard, file_id = stored
    unknown = {"job": "job_" + "f" * 32, "shd": "shd_" + "f" * 32, "file": "file-" + "f" * 32, "batch": "batch_" + "f" * 32}
    for url in [f"/v1/jobs/{unknown['job']}", f"/v1/jobs/{unknown['job']}/shards", f"/v1/shards/{unknown['shd']}",
                f"/v1/files/{unknown['file']}/content", f"/v1/batches/{unknown['batch']}"]:
        assert api.get(url).status_code == 404, url
    assert api.get(shard.url).status_code == 200 and api.get(f"/v1/files/{file_id}/content").status_code == 200


def test_a_cursor_that_is_not_an_id_is_rejected_naming_it(api):
    for url in ["/v1/jobs?after=..%2f..%2fetc%2fpasswd", "/v1/batches?after=%00", "/v1/jobs?after=" + "a" * 5000]:
        response = api.get(url)
        assert response.status_code == 422, url
        assert response.json()["error"]["field"] == "after"


@pytest.mark.parametrize("storage_uri, storage_download", [("local", "proxy"), ("s3", "proxy"), ("s3", "redirect")],
                         indirect=True)
def test_a_damaged_shard_is_reported_without_its_storage_path(api, rt):
    shard = add_job_shard(api, rt)
    rt.storage.write_bytes(shard.path, b"garbage")  # through the port: a local file or an S3 object
    response = api.get(shard.url)
    assert response.status_code == 500 and response.json()["error"]["code"] == "shard_damaged"
    assert str(rt.storage.root) not in response.text and "parquet" not in response.text
