"""A native job from an uploaded JSONL file (`POST /v1/files`, then `POST /v1/jobs` with
`input_file_id`): the same job as the same requests given as a body, a refused line named and
nothing left behind, a few hundred thousand requests in bounded API memory, and the client and
CLI sending a large file that way. Real Postgres; the scripted engine runs the jobs."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

import teachercache as tc
from service.jobs import input_file
from teachercache import _jsonl, cli
from tests.integration.test_client_live import NO_SLEEP, client, live_url, serve_on_loopback  # noqa: F401
from tests.integration.test_pipeline_scripted import batch
from tests.integration.test_tenants import set_tenant_limit
from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"


def upload(api, data: bytes, filename: str = "in.jsonl") -> str:
    response = api.post("/v1/files", files={"file": (filename, data)}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def jsonl(requests: list[dict], newline: str = "\n") -> bytes:
    return (newline.join(json.dumps(r) for r in requests) + newline).encode()


def envelope(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "requests"}


def table_counts(rt) -> dict[str, int]:
    with rt.sessions() as db:
        return {t: db.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ("jobs", "requests", "tasks")}


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 4 requests, so a file of a dozen lines is written in several."""
    monkeypatch.setattr(input_file, "BATCH_REQUESTS", 4)


def test_a_file_job_has_the_shards_of_the_same_requests_given_as_a_body(api, start_worker, small_batches):
    body = batch(12)
    body["requests"][9] = {"custom_id": "again", "prompt_token_ids": [1, 2, 3, 10]}  # request 0's key, a batch later
    lines = jsonl(body["requests"], newline="\r\n").replace(b"\r\n", b"\r\n\n", 1)  # Windows endings, a blank line
    from_file = api.post("/v1/jobs", json={**envelope(body), "input_file_id": upload(api, lines)})
    from_body = api.post("/v1/jobs", json=body)
    assert from_file.status_code == from_body.status_code == 201, from_file.text
    assert from_file.json()["counts"] == from_body.json()["counts"]
    start_worker(ScriptedEngine())
    file_job, body_job = wait_for(api, from_file.json()["id"]), wait_for(api, from_body.json()["id"])
    assert file_job["status"] == body_job["status"] == "succeeded"
    file_rows, body_rows = download_rows(api, file_job), download_rows(api, body_job)
    assert len(file_rows) == 12 * 2 and file_rows == body_rows


def bad_lines() -> list[tuple[int, bytes, str]]:
    good = [json.dumps({"custom_id": f"q{i}", "prompt_token_ids": [5, i + 1]}) for i in range(10)]

    def replaced(index: int, line: str) -> bytes:
        return "\n".join(good[:index] + [line] + good[index + 1:]).encode()

    return [
        (8, replaced(7, '{"custom_id": "x", "prompt_token_ids": [1, 2'), "not a JSON request object"),
        (3, replaced(2, '{"custom_id": "x", "prompt_token_ids": [1], "colour": "red"}'), "requests[2].colour"),
        (6, replaced(5, '{"custom_id": "x", "prompt_token_ids": [1, 999999]}'), "outside the teacher's vocabulary"),
        (10, replaced(9, '{"custom_id": "q1", "prompt_token_ids": [7]}'), "duplicate of requests[1] (line 2)"),
        (5, replaced(4, '[1, 2, 3]'), "requests[4]"),
        (7, replaced(6, '{"custom_id": "x", "prompt": "hi", "prompt_token_ids": [1]}'), "exactly one of"),
    ]


@pytest.mark.parametrize("line, data, problem", bad_lines(), ids=["json", "field", "vocab", "dup", "array", "two"])
def test_a_bad_line_is_refused_naming_it_and_nothing_is_created(api, rt, small_batches, line, data, problem):
    before = table_counts(rt)
    response = api.post("/v1/jobs", json={"teacher": TEACHER, "input_file_id": upload(api, data)})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["line"] == line and error["message"].startswith(f"line {line}: ") and problem in error["message"]
    assert table_counts(rt) == before


def test_a_refused_file_spends_no_submission_and_a_retry_returns_the_same_job(api, rt, small_batches):
    # One submission, refilled about never: a refused file must not spend it.
    set_tenant_limit(rt, "alpha", "submissions_per_minute", 0.001)
    set_tenant_limit(rt, "alpha", "submission_burst", 1)
    bad = upload(api, jsonl([{"prompt_token_ids": [1]}, {"prompt_token_ids": [-1]}]))
    assert api.post("/v1/jobs", json={"input_file_id": bad}).status_code == 422
    good = upload(api, jsonl([{"prompt_token_ids": [1, i]} for i in range(9)]))
    first = api.post("/v1/jobs", json={"input_file_id": good}, headers={"Idempotency-Key": "k"})
    assert first.status_code == 201, first.text  # the token the refused file did not spend
    again = api.post("/v1/jobs", json={"input_file_id": good}, headers={"Idempotency-Key": "k"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert api.post("/v1/jobs", json={"input_file_id": good}).status_code == 429  # the bucket is empty now


def test_a_file_job_is_held_to_the_request_token_and_pending_limits(api, rt):
    file_id = upload(api, jsonl([{"prompt_token_ids": [1, i]} for i in range(20)]))
    for limit, value, status in [("max_requests_per_job", 10, 422), ("max_tokens_per_job", 150, 422),
                                 ("max_pending_requests_per_tenant", 10, 429)]:
        set_tenant_limit(rt, "alpha", limit, value)
        response = api.post("/v1/jobs", json={"input_file_id": file_id, "sampling": {"max_tokens": 8}})
        assert response.status_code == status and response.json()["error"]["limit"] == limit, response.text
        set_tenant_limit(rt, "alpha", limit, None)
    assert table_counts(rt)["jobs"] == 0


def test_another_tenants_file_and_an_unknown_one_are_not_found(api, other_api):
    file_id = upload(api, jsonl([{"prompt_token_ids": [1]}]))
    for caller, file in [(other_api, file_id), (api, "file-" + "0" * 32)]:
        response = caller.post("/v1/jobs", json={"input_file_id": file})
        assert response.status_code == 404 and response.json()["error"]["field"] == "input_file_id"


def test_an_empty_file_and_a_body_with_both_sources_are_refused(api):
    empty = upload(api, b"\n\n")
    assert api.post("/v1/jobs", json={"input_file_id": empty}).json()["error"]["field"] == "input_file_id"
    both = api.post("/v1/jobs", json={"input_file_id": empty, "requests": [{"prompt": "a"}]})
    assert both.status_code == 422 and both.json()["error"]["field"] == "requests"


@pytest.fixture
def upload_everything(monkeypatch):
    """The client's large-file path for a file of any size."""
    monkeypatch.setattr(_jsonl, "UPLOAD_ABOVE_BYTES", 0)


def test_the_client_uploads_a_large_file_and_submits_it_by_id(client, rt, start_worker, tmp_path,  # noqa: F811
                                                               upload_everything):
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl([{"custom_id": f"c{i}", "prompt_token_ids": [3, i + 1]} for i in range(7)]))
    job = client.submit(jsonl_path=path, teacher=TEACHER, sampling={"max_tokens": 4}, idempotency_key="same")
    assert job["counts"]["total"] == 7
    assert client.submit(jsonl_path=path, teacher=TEACHER, sampling={"max_tokens": 4},
                         idempotency_key="same")["id"] == job["id"]  # a second upload, the same job
    with rt.sessions() as db:
        assert db.execute(sa.text("SELECT count(*) FROM files WHERE purpose = 'batch'")).scalar_one() == 2
    start_worker(ScriptedEngine())
    finished = client.wait(job, poll_interval=0.05, progress=False)
    assert finished["status"] == "succeeded" and finished["counts"]["completed"] == 7


def test_the_cli_submits_a_large_file_by_upload(live_url, rt, tmp_path, upload_everything):  # noqa: F811
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl([{"prompt_token_ids": [4, i + 1]} for i in range(5)]))
    result = CliRunner().invoke(cli.app, ["submit", str(path), "--url", live_url, "--json", "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["counts"]["total"] == 5
    with rt.sessions() as db:
        assert db.execute(sa.text("SELECT count(*) FROM files")).scalar_one() == 1


def test_the_client_sends_a_small_file_as_the_job_body(client, rt, tmp_path):  # noqa: F811
    path = tmp_path / "small.jsonl"
    path.write_bytes(jsonl([{"prompt_token_ids": [4, 2]}]))
    assert client.submit(jsonl_path=path)["counts"]["total"] == 1
    with rt.sessions() as db:
        assert db.execute(sa.text("SELECT count(*) FROM files")).scalar_one() == 0


def test_the_async_client_uploads_a_large_file_too(live_url, tmp_path, upload_everything):  # noqa: F811
    import asyncio

    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl([{"prompt_token_ids": [6, i + 1]} for i in range(3)]))

    async def submit() -> dict:
        async with tc.AsyncClient(live_url, retry=NO_SLEEP) as async_client:
            return await async_client.submit(jsonl_path=path, sampling={"max_tokens": 4})

    assert asyncio.run(submit())["counts"]["total"] == 3


def test_a_file_job_counts_each_cached_result_once_across_its_batches(api, rt, start_worker, small_batches):
    """Batches of 4: a cached prompt in the first batch and again in the third is one result the
    job saved, as when the same requests come as a body (one batch), and as a recount says."""
    from tests.counters import recount_spend
    from tests.integration.test_cache import prompts, run_to_end

    cached = run_to_end(api, start_worker, prompts(range(2)))  # [7, 8, 0] and [7, 8, 1] in the cache
    again = prompts(range(2))["requests"]
    requests = again + prompts(range(10, 16))["requests"] + [{**r, "custom_id": f"again-{r['custom_id']}"}
                                                              for r in again]
    body = {**prompts(range(0))} | {"requests": requests}
    from_file = api.post("/v1/jobs", json={**envelope(body), "input_file_id": upload(api, jsonl(requests))})
    assert from_file.status_code == 201, from_file.text
    from_body = api.post("/v1/jobs", json=body)
    file_job, body_job = from_file.json(), from_body.json()
    assert file_job["counts"]["cached"] == body_job["counts"]["cached"] == 4
    assert file_job["spend"]["cached_prompt_tokens"] == cached["spend"]["prompt_tokens_sent"] == 2 * 3
    assert file_job["spend"] == body_job["spend"]
    with rt.sessions() as db:
        assert recount_spend(db, file_job["id"])[True] == (file_job["spend"]["cached_prompt_tokens"],
                                                           file_job["spend"]["cached_completion_tokens"])
