"""The client package against a contract double: a small FastAPI app that imitates the
HTTP contract of DESIGN.md (it is not the real server), driven in process through the
client's injectable transport. Tests against the real service live elsewhere."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from typer.testing import CliRunner

import teachercache as tc
from teachercache import cli
from teachercache.testing import SyncASGITransport

BASE_URL = "http://teachercache.test"
API_KEY = "sk-test"


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class ContractDouble:
    """Imitates the service's v1 HTTP contract closely enough to exercise the client.

    Jobs advance one step per GET (queued -> running -> succeeded, or failed when their
    metadata says ``{"fail": true}``), and a succeeded job's manifest lists every
    published shard. ``faults`` are responses served instead of the next requests;
    ``shard_faults`` misbehave on the next shard downloads: ``truncate`` (drops the
    connection half-way), ``ignore_range`` (answers 200 with the whole file),
    ``corrupt`` (flips a byte).
    """

    def __init__(self, shard_dir: Path) -> None:
        self.shard_dir = shard_dir
        self.jobs: dict[str, dict[str, Any]] = {}
        self.by_idempotency_key: dict[str, str] = {}
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.submissions: list[dict[str, Any]] = []
        self.faults: list[tuple[int, dict[str, str]]] = []
        self.shard_faults: list[str] = []
        self.manifest: list[dict[str, Any]] = []
        self.app = self._build_app()

    # -- what tests set up ---------------------------------------------------------

    def publish_shard(self, name: str, data: bytes) -> dict[str, Any]:
        (self.shard_dir / name).write_bytes(data)
        entry = {
            "index": len(self.manifest),
            "url": f"/v1/shards/{name}",
            "rows": 10,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self.manifest.append(entry)
        return entry

    def queued_job(self) -> dict[str, Any]:
        return self._new_job({"requests": [{"prompt": "x"}]})

    def finished_job(self) -> dict[str, Any]:
        job = self.queued_job()
        self._finish(job, "succeeded")
        return job

    def shard_requests(self) -> list[dict[str, str]]:
        return [headers for method, path, headers in self.seen if path.startswith("/v1/shards/")]

    # -- the app -------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI()
        app.middleware("http")(self._record_and_inject_faults)
        app.get("/v1/teachers")(self._teachers)
        app.post("/v1/jobs", status_code=201)(self._submit)
        app.get("/v1/jobs")(self._list)
        app.get("/v1/jobs/{job_id}")(self._get)
        app.post("/v1/jobs/{job_id}/cancel")(self._cancel)
        app.get("/v1/jobs/{job_id}/errors")(self._errors)
        app.get("/v1/jobs/{job_id}/shards")(self._shards)
        app.get("/v1/shards/{name}")(self._shard_file)
        return app

    async def _record_and_inject_faults(self, request: Request, call_next: Any) -> Response:
        self.seen.append((request.method, request.url.path, dict(request.headers)))
        if self.faults:
            status, headers = self.faults.pop(0)
            return error_response(status, "injected", f"injected {status}", headers)
        return await call_next(request)

    async def _teachers(self) -> dict[str, Any]:
        return {"teachers": [{"name": "smollm2-135m-instruct", "max_top_logprobs": 20, "vocab_size": 49152}]}

    async def _submit(self, request: Request) -> Response:
        chunks = [chunk async for chunk in request.stream() if chunk]
        try:
            body = json.loads(b"".join(chunks))
        except ValueError:
            return error_response(400, "invalid_json", "body is not JSON")
        self.submissions.append({"body": body, "chunks": len(chunks), "headers": dict(request.headers)})
        if not body.get("requests") or not all(isinstance(item, dict) for item in body["requests"]):
            return error_response(422, "invalid_request", "requests must be a non-empty list of objects")
        key = request.headers.get("idempotency-key")
        if key in self.by_idempotency_key:
            return JSONResponse(self.jobs[self.by_idempotency_key[key]], status_code=200)
        job = self._new_job(body)
        self.by_idempotency_key[key or job["id"]] = job["id"]
        return JSONResponse(job, status_code=201)

    async def _list(self, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        newest_first = list(reversed(self.jobs.values()))
        start = next((i + 1 for i, job in enumerate(newest_first) if job["id"] == after), 0)
        page = newest_first[start : start + limit]
        has_more = start + limit < len(newest_first)
        return {"data": page, "has_more": has_more, "next": page[-1]["id"] if has_more else None}

    async def _get(self, job_id: str) -> Response:
        job = self.jobs.get(job_id)
        if job is None:
            return error_response(404, "not_found", f"no job {job_id}")
        self._advance(job)
        return JSONResponse(job)

    async def _cancel(self, job_id: str) -> Response:
        job = self.jobs.get(job_id)
        if job is None:
            return error_response(404, "not_found", f"no job {job_id}")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return error_response(409, "conflict", f"job {job_id} already {job['status']}")
        self._finish(job, "cancelled")
        return JSONResponse(job)

    async def _errors(self, job_id: str) -> dict[str, Any]:
        return {"errors": [{"request_index": 1, "custom_id": "b", "error": "prompt too long"}]}

    async def _shards(self, job_id: str) -> dict[str, Any]:
        return {"shards": self.jobs[job_id].get("shards") or []}

    async def _shard_file(self, name: str, request: Request) -> Response:
        path = self.shard_dir / name
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        headers = {"ETag": f'"{sha}"', "X-Content-SHA256": sha}
        fault = self.shard_faults.pop(0) if self.shard_faults else None
        if fault is None:
            return FileResponse(path, headers=headers, media_type="application/vnd.apache.parquet")
        return self._faulty_shard(path.read_bytes(), fault, headers)

    @staticmethod
    def _faulty_shard(data: bytes, fault: str, headers: dict[str, str]) -> Response:
        if fault == "truncate":
            # Promise the whole file, send half: what a dropped connection looks like.
            return Response(data[: len(data) // 2], headers={**headers, "Content-Length": str(len(data))})
        if fault == "corrupt":
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        return Response(data, headers=headers)  # "ignore_range" and "corrupt": a 200 with every byte

    # -- job bookkeeping -----------------------------------------------------------

    def _new_job(self, body: dict[str, Any]) -> dict[str, Any]:
        total = len(body["requests"])
        job = {
            "id": f"job_{uuid.uuid4().hex[:12]}",
            "status": "queued",
            "counts": {"total": total, "completed": 0, "cached": 0, "failed": 0, "pending": total},
            "teacher": body.get("teacher", "smollm2-135m-instruct"),
            "mode": body.get("mode", "generate"),
            "top_logprobs": body.get("top_logprobs", 20),
            "sampling": body.get("sampling", {}),
            "metadata": body.get("metadata", {}),
            "created_at": "2025-01-01T00:00:00Z",
            "started_at": None,
            "finished_at": None,
        }
        self.jobs[job["id"]] = job
        return job

    def _advance(self, job: dict[str, Any]) -> None:
        if job["status"] == "queued":
            job["status"], job["started_at"] = "running", "2025-01-01T00:00:01Z"
            job["counts"].update(completed=1, pending=job["counts"]["total"] - 1)
        elif job["status"] == "running":
            self._finish(job, "failed" if job["metadata"].get("fail") else "succeeded")

    def _finish(self, job: dict[str, Any], status: str) -> None:
        counts = job["counts"]
        counts.update(completed=counts["total"] - 1, cached=0, failed=1, pending=0)
        job.update(status=status, finished_at="2025-01-01T00:00:02Z", shards=list(self.manifest))


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def double(tmp_path: Path) -> ContractDouble:
    shard_dir = tmp_path / "served"
    shard_dir.mkdir()
    return ContractDouble(shard_dir)


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(double: ContractDouble, sleeps: list[float]) -> Any:
    retry = tc.RetryPolicy(max_attempts=4, sleep=sleeps.append)  # record waits instead of sleeping
    with tc.Client(BASE_URL, api_key=API_KEY, transport=SyncASGITransport(double.app), retry=retry) as client:
        yield client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def shard_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that are not all alike, so a misplaced range changes the hash."""
    blocks = (hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# -- submitting --------------------------------------------------------------------


def test_teachers_are_listed(client: tc.Client) -> None:
    assert client.teachers()[0]["name"] == "smollm2-135m-instruct"


def test_submit_inline_sends_the_envelope_with_auth_and_an_idempotency_key(
    client: tc.Client, double: ContractDouble
) -> None:
    job = client.submit(
        [{"custom_id": "a", "prompt": "hi"}],
        teacher="t",
        top_logprobs=5,
        sampling={"max_tokens": 8, "seed": None},
    )
    sent = double.submissions[0]
    assert job["status"] == "queued" and job["counts"]["total"] == 1
    assert sent["body"] == {
        "teacher": "t",
        "mode": "generate",
        "top_logprobs": 5,
        "sampling": {"max_tokens": 8},
        "requests": [{"custom_id": "a", "prompt": "hi"}],
    }
    assert sent["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert sent["headers"]["idempotency-key"]


def test_submit_jsonl_streams_the_file_as_the_requests_list(
    client: tc.Client, double: ContractDouble, tmp_path: Path
) -> None:
    requests = [{"custom_id": f"q{i}", "prompt": "x" * 200} for i in range(3000)]
    path = write_jsonl(
        tmp_path / "batch.jsonl",
        [json.dumps(r) for r in requests[:1500]] + [""] + [json.dumps(r) for r in requests[1500:]],
    )
    job = client.submit(jsonl_path=path, teacher="t", metadata={"dataset": "demo"})
    sent = double.submissions[0]
    assert sent["body"] == {
        "teacher": "t",
        "mode": "generate",
        "metadata": {"dataset": "demo"},
        "requests": requests,
    }
    assert sent["chunks"] > 1 and "content-length" not in sent["headers"]  # streamed, not buffered
    assert job["counts"]["total"] == 3000


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"prompt": "unterminated', "not valid JSON"),
        ('["a", "list"]', "not an object"),
        ("42", "not an object"),
    ],
)
def test_submit_jsonl_bad_line_is_named_and_nothing_is_sent(
    client: tc.Client, double: ContractDouble, tmp_path: Path, bad_line: str, problem: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a"}', "", bad_line, '{"prompt": "b"}'])
    with pytest.raises(tc.ValidationError, match=f"line 3 .*{problem}") as raised:
        client.submit(jsonl_path=path)
    assert raised.value.line_number == 3 and raised.value.status_code is None
    assert double.seen == []


def test_submit_same_idempotency_key_returns_the_same_job(client: tc.Client, double: ContractDouble) -> None:
    first = client.submit([{"prompt": "a"}], idempotency_key="k1")
    again = client.submit([{"prompt": "a"}], idempotency_key="k1")
    assert first["id"] == again["id"] and len(double.jobs) == 1


def test_submit_takes_exactly_one_source(client: tc.Client, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        client.submit()
    with pytest.raises(TypeError):
        client.submit([{"prompt": "a"}], jsonl_path=tmp_path / "x.jsonl")


# -- job state ---------------------------------------------------------------------


def test_wait_polls_until_the_job_finishes(client: tc.Client, double: ContractDouble) -> None:
    double.publish_shard("part-0.parquet", shard_bytes(1000))
    job = client.wait(client.submit([{"prompt": "a"}, {"prompt": "b"}]), poll_interval=0, progress=False)
    assert job["status"] == "succeeded" and job["counts"]["completed"] + job["counts"]["failed"] == 2
    assert job["shards"][0]["url"] == "/v1/shards/part-0.parquet"


def test_wait_with_a_progress_bar(client: tc.Client) -> None:
    assert (
        client.wait(client.submit([{"prompt": "a"}]), poll_interval=0, progress=True)["status"] == "succeeded"
    )


def test_wait_raises_for_a_failed_job_only_when_asked(client: tc.Client) -> None:
    job = client.submit([{"prompt": "a"}], metadata={"fail": True})
    with pytest.raises(tc.JobFailedError) as raised:
        client.wait(job, poll_interval=0, progress=False, raise_on_failure=True)
    assert raised.value.job["status"] == "failed"
    assert client.wait(job, poll_interval=0, progress=False)["status"] == "failed"


def test_wait_times_out(client: tc.Client, double: ContractDouble) -> None:
    job = client.submit([{"prompt": "a"}])
    double.jobs[job["id"]]["status"] = "finalizing"  # a state the double never leaves
    with pytest.raises(tc.WaitTimeoutError) as raised:
        client.wait(job, poll_interval=0.01, timeout=0.05, progress=False)
    assert isinstance(raised.value, TimeoutError) and raised.value.job["status"] == "finalizing"


def test_list_pages_newest_first(client: tc.Client) -> None:
    ids = [client.submit([{"prompt": str(i)}])["id"] for i in range(5)]
    page = client.list(limit=2)
    assert [job["id"] for job in page["data"]] == ids[:-3:-1] and page["has_more"]
    assert [job["id"] for job in client.list(limit=2, cursor=page["next"])["data"]] == ids[2:0:-1]
    assert [job["id"] for job in client.iter_jobs(page_size=2)] == ids[::-1]


def test_cancel_and_errors(client: tc.Client) -> None:
    job = client.submit([{"prompt": "a"}, {"prompt": "b"}])
    assert client.cancel(job)["status"] == "cancelled"
    assert client.errors(job["id"]) == [{"request_index": 1, "custom_id": "b", "error": "prompt too long"}]


# -- errors and retries ------------------------------------------------------------


def test_error_responses_map_to_the_exception_tree(client: tc.Client, double: ContractDouble) -> None:
    with pytest.raises(tc.NotFoundError) as not_found:
        client.get("job_missing")
    assert (not_found.value.status_code, not_found.value.code) == (404, "not_found")
    assert not_found.value.body == {"error": {"code": "not_found", "message": "no job job_missing"}}
    with pytest.raises(tc.ValidationError):
        client.submit([])
    with pytest.raises(tc.ConflictError, match="already cancelled"):
        client.cancel(client.cancel(client.submit([{"prompt": "a"}])))


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(400, tc.ValidationError), (401, tc.AuthenticationError), (413, tc.PayloadTooLargeError), (418, tc.APIError),
     (500, tc.ServerError)],
)
def test_non_transient_errors_are_raised_at_once(
    client: tc.Client, double: ContractDouble, status: int, error_class: type
) -> None:
    double.faults.append((status, {}))
    with pytest.raises(error_class) as raised:
        client.teachers()
    assert raised.value.status_code == status and isinstance(raised.value, tc.TeachercacheError)
    assert len(double.seen) == 1


def test_503_is_retried_honouring_retry_after(
    client: tc.Client, double: ContractDouble, sleeps: list[float]
) -> None:
    double.faults += [(503, {"Retry-After": "7"}), (429, {"Retry-After": "2"})]
    assert client.teachers()[0]["name"] == "smollm2-135m-instruct"
    assert sleeps == [7.0, 2.0] and len(double.seen) == 3


def test_retries_give_up_after_max_attempts(
    client: tc.Client, double: ContractDouble, sleeps: list[float]
) -> None:
    double.faults += [(503, {})] * 10
    with pytest.raises(tc.ServerError) as raised:
        client.teachers()
    assert raised.value.status_code == 503 and len(double.seen) == 4
    assert len(sleeps) == 3 and all(0 <= s <= 30 for s in sleeps)  # jittered backoff without Retry-After


class DropsFirstConnections(httpx.BaseTransport):
    """Fails the first ``failures`` requests as if the service could not be reached."""

    def __init__(self, inner: httpx.BaseTransport, failures: int) -> None:
        self.inner, self.failures = inner, failures

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.failures:
            self.failures -= 1
            raise httpx.ConnectError("connection refused", request=request)
        return self.inner.handle_request(request)


def test_connect_errors_are_retried_then_raised_as_transport_errors(
    double: ContractDouble, sleeps: list[float]
) -> None:
    transport = DropsFirstConnections(SyncASGITransport(double.app), failures=2)
    retry = tc.RetryPolicy(max_attempts=3, sleep=sleeps.append)
    with tc.Client(BASE_URL, transport=transport, retry=retry) as client:
        assert client.teachers()
        transport.failures = 3
        with pytest.raises(tc.TransportError, match="connection refused"):
            client.teachers()


def test_a_jsonl_body_is_resent_whole_on_retry(
    client: tc.Client, double: ContractDouble, tmp_path: Path
) -> None:
    double.faults.append((502, {}))
    path = write_jsonl(tmp_path / "batch.jsonl", ['{"prompt": "a"}', '{"prompt": "b"}'])
    assert client.submit(jsonl_path=path)["counts"]["total"] == 2
    assert double.submissions[0]["body"]["requests"] == [{"prompt": "a"}, {"prompt": "b"}]


# -- downloads ---------------------------------------------------------------------


def test_download_writes_verified_shards(client: tc.Client, double: ContractDouble, tmp_path: Path) -> None:
    data = [shard_bytes(5000, seed) for seed in range(3)]
    for index, blob in enumerate(data):
        double.publish_shard(f"part-{index}.parquet", blob)
    paths = client.download(double.finished_job(), tmp_path / "out")
    assert [path.name for path in paths] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert [path.read_bytes() for path in paths] == data
    assert not list((tmp_path / "out").glob("*.part"))


def test_download_resumes_a_dropped_connection_with_range(
    client: tc.Client, double: ContractDouble, tmp_path: Path
) -> None:
    data = shard_bytes(100_000)
    entry = double.publish_shard("part-0.parquet", data)
    double.shard_faults.append("truncate")
    [path] = client.download(double.finished_job(), tmp_path / "out")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    first, resumed = double.shard_requests()
    assert "range" not in first
    assert resumed["range"] == f"bytes={len(data) // 2}-" and resumed["if-range"] == f'"{entry["sha256"]}"'


def test_download_resumes_a_part_file_left_by_an_earlier_run(
    client: tc.Client, double: ContractDouble, tmp_path: Path
) -> None:
    data = shard_bytes(10_000)
    double.publish_shard("part-0.parquet", data)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0.parquet.part").write_bytes(data[:4096])
    [path] = client.download(double.finished_job(), tmp_path / "out")
    assert path.read_bytes() == data
    assert [headers["range"] for headers in double.shard_requests()] == ["bytes=4096-"]


def test_download_restarts_when_the_server_ignores_range(
    client: tc.Client, double: ContractDouble, tmp_path: Path
) -> None:
    data = shard_bytes(10_000)
    double.publish_shard("part-0.parquet", data)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0.parquet.part").write_bytes(data[:4096])
    double.shard_faults.append("ignore_range")
    [path] = client.download(double.finished_job(), tmp_path / "out")
    assert path.read_bytes() == data and len(double.shard_requests()) == 1


def test_download_of_a_corrupted_shard_raises_and_keeps_nothing(
    client: tc.Client, double: ContractDouble, tmp_path: Path
) -> None:
    entry = double.publish_shard("part-0.parquet", shard_bytes(10_000))
    double.shard_faults.append("corrupt")
    with pytest.raises(tc.IntegrityError) as raised:
        client.download(double.finished_job(), tmp_path / "out")
    assert raised.value.expected == entry["sha256"] and raised.value.actual != entry["sha256"]
    assert list((tmp_path / "out").iterdir()) == []


def test_download_again_skips_verified_files(
    client: tc.Client, double: ContractDouble, tmp_path: Path
) -> None:
    double.publish_shard("part-0.parquet", shard_bytes(10_000))
    job = double.finished_job()
    client.download(job, tmp_path / "out")
    client.download(job, tmp_path / "out")
    assert len(double.shard_requests()) == 1


def test_absolute_shard_urls_on_another_host_get_no_api_key(
    client: tc.Client, double: ContractDouble, tmp_path: Path
) -> None:
    data = shard_bytes(3000)
    double.publish_shard("part-0.parquet", data)
    double.publish_shard("part-1.parquet", data)
    double.manifest[0]["url"] = f"{BASE_URL}/v1/shards/part-0.parquet"
    double.manifest[1]["url"] = "http://objects.example/v1/shards/part-1.parquet"
    paths = client.download(double.finished_job(), tmp_path / "out")
    assert [path.read_bytes() for path in paths] == [data, data]
    same_host, other_host = double.shard_requests()
    assert same_host["authorization"] == f"Bearer {API_KEY}" and "authorization" not in other_host


# -- AsyncClient -------------------------------------------------------------------


@pytest.fixture
def async_client(double: ContractDouble, sleeps: list[float]) -> tc.AsyncClient:
    retry = tc.RetryPolicy(max_attempts=4, sleep=sleeps.append)
    return tc.AsyncClient(BASE_URL, api_key=API_KEY, transport=httpx.ASGITransport(double.app), retry=retry)


@pytest.mark.anyio
async def test_async_submit_jsonl_wait_and_list(
    async_client: tc.AsyncClient, double: ContractDouble, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "batch.jsonl", ['{"prompt": "a"}', '{"prompt": "b"}'])
    async with async_client as client:
        job = await client.submit(jsonl_path=path, sampling={"n": 2})
        finished = await client.wait(job, poll_interval=0, progress=False)
        assert finished["status"] == "succeeded"
        assert (await client.list())["data"][0]["id"] == job["id"]
        assert (await client.teachers())[0]["name"] == "smollm2-135m-instruct"
    assert double.submissions[0]["body"]["requests"] == [{"prompt": "a"}, {"prompt": "b"}]


@pytest.mark.anyio
async def test_async_retries_and_maps_errors(
    async_client: tc.AsyncClient, double: ContractDouble, sleeps: list[float]
) -> None:
    double.faults.append((503, {"Retry-After": "3"}))
    async with async_client as client:
        assert await client.errors("any")
        with pytest.raises(tc.NotFoundError):
            await client.get("job_missing")
    assert sleeps == [3.0]


@pytest.mark.anyio
async def test_async_download_resumes_a_truncated_body(
    async_client: tc.AsyncClient, double: ContractDouble, tmp_path: Path
) -> None:
    data = shard_bytes(50_000)
    double.publish_shard("part-0.parquet", data)
    double.shard_faults.append("truncate")
    async with async_client as client:
        [path] = await client.download(double.finished_job(), tmp_path / "out")
    assert path.read_bytes() == data
    assert double.shard_requests()[1]["range"] == f"bytes={len(data) // 2}-"


# -- CLI ---------------------------------------------------------------------------


@pytest.fixture
def cli_runner(double: ContractDouble, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    def client_over_the_double(url: str, api_key: str | None = None) -> tc.Client:
        return tc.Client(
            url,
            api_key=api_key,
            transport=SyncASGITransport(double.app),
            retry=tc.RetryPolicy(sleep=lambda s: None),
        )

    monkeypatch.setattr(cli, "Client", client_over_the_double)
    return CliRunner()


def test_cli_submit_wait_and_download(cli_runner: CliRunner, double: ContractDouble, tmp_path: Path) -> None:
    double.publish_shard("part-0.parquet", shard_bytes(2000))
    path = write_jsonl(tmp_path / "batch.jsonl", ['{"prompt": "a"}'])
    args = [
        "submit",
        str(path),
        "--max-tokens",
        "16",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "out"),
        "--json",
        "--url",
        BASE_URL,
    ]
    result = cli_runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["job"]["status"] == "succeeded" and Path(printed["files"][0]).exists()
    assert double.submissions[0]["body"]["sampling"] == {"max_tokens": 16, "seed": 3}


def test_cli_reports_errors_with_exit_status_1(cli_runner: CliRunner, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a"}', "nope"])
    result = cli_runner.invoke(cli.app, ["submit", str(path)])
    assert result.exit_code == 1 and "line 2" in result.output
    assert cli_runner.invoke(cli.app, ["status", "job_missing", "--json"]).exit_code == 1


def test_cli_status_list_cancel_errors_as_json(cli_runner: CliRunner, double: ContractDouble) -> None:
    job = double.queued_job()
    assert json.loads(cli_runner.invoke(cli.app, ["status", job["id"], "--json"]).stdout)["id"] == job["id"]
    assert json.loads(cli_runner.invoke(cli.app, ["list", "--json"]).stdout)["data"][0]["id"] == job["id"]
    assert (
        json.loads(cli_runner.invoke(cli.app, ["cancel", job["id"], "--json"]).stdout)["status"]
        == "cancelled"
    )
    assert (
        json.loads(cli_runner.invoke(cli.app, ["errors", job["id"], "--json"]).stdout)[0]["custom_id"] == "b"
    )
    assert cli_runner.invoke(cli.app, ["list"]).exit_code == 0


class FakeEntryPoint:
    def __init__(self, register: Any, name: str = "server") -> None:
        self._register = register
        self.name = name

    def load(self) -> Any:
        if isinstance(self._register, Exception):
            raise self._register
        return self._register


def test_main_adds_plugin_commands_and_skips_uninstalled_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[Any] = []
    plugins = [
        FakeEntryPoint(ModuleNotFoundError("No module named 'service'")),
        FakeEntryPoint(registered.append),
    ]
    monkeypatch.setattr(
        cli.importlib.metadata, "entry_points", lambda group: plugins if group == "teachercache.cli" else []
    )
    monkeypatch.setattr(cli, "app", lambda: registered.append("ran"))
    monkeypatch.setattr(cli.sys, "argv", ["teachercache"])
    cli.main()
    assert registered == [cli.app, "ran"]  # the plugin registered on the app, then the app ran


def test_a_server_command_without_the_server_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = ImportError("teachercache's server needs the `server` extra: pip install 'teachercache[server]'")
    plugins = [FakeEntryPoint(missing, "server"), FakeEntryPoint(missing, "worker")]
    monkeypatch.setattr(
        cli.importlib.metadata, "entry_points", lambda group: plugins if group == "teachercache.cli" else []
    )
    monkeypatch.setattr(cli.sys, "argv", ["teachercache", "serve", "--port", "1"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "'serve'" in error and error.count("pip install 'teachercache[server]'") == 1
    monkeypatch.setattr(cli.sys, "argv", ["teachercache", "status", "--help"])  # a client command still runs
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 0 and "Show a job" in capsys.readouterr().out
