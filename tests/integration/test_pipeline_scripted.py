"""The control plane end to end with a scripted engine (no model): submission, queue, worker
loop, result shards, job assembly, status and download, on a real Postgres.

The real engine runs the same path in test_pipeline_vllm.py.
"""

from __future__ import annotations

import pytest

from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"


def batch(n: int = 6, **extra) -> dict:
    requests = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            requests.append({"custom_id": f"r{i}", "prompt": f"Say the number {i}."})
        elif kind == 1:
            requests.append({"custom_id": f"r{i}", "messages": [{"role": "user", "content": f"Count to {i}."}]})
        else:
            requests.append({"custom_id": f"r{i}", "prompt_token_ids": [1, 2, 3, i + 10]})
    return {"teacher": TEACHER, "top_logprobs": 5, "sampling": {"max_tokens": 8, "n": 2}, "requests": requests, **extra}


def test_job_runs_to_succeeded_with_every_request_in_order(api, start_worker):
    job = api.post("/v1/jobs", json=batch()).json()
    assert job["status"] == "queued" and job["counts"]["total"] == 6
    start_worker(ScriptedEngine())
    job = wait_for(api, job["id"])
    assert job["status"] == "succeeded"
    assert job["counts"] == {"total": 6, "completed": 6, "cached": 0, "failed": 0, "pending": 0, "cancelled": 0}
    rows = download_rows(api, job)
    assert [(r["request_index"], r["sample_index"]) for r in rows] == [(i, s) for i in range(6) for s in range(2)]
    assert [r["custom_id"] for r in rows[::2]] == [f"r{i}" for i in range(6)]
    assert all(len(r["completion_token_ids"]) == 8 and len(r["top_token_ids"][0]) == 5 for r in rows)
    assert rows[4]["prompt_token_ids"] == [1, 2, 3, 12]


def test_chat_prompt_is_tokenized_with_the_chat_template(api, start_worker, rt):
    job = api.post("/v1/jobs", json=batch(2)).json()
    start_worker(ScriptedEngine())
    rows = download_rows(api, wait_for(api, job["id"]))
    teacher = rt.teachers.get(TEACHER)
    expected = teacher.encode_chat([{"role": "user", "content": "Count to 1."}])
    assert rows[2]["prompt_token_ids"] == expected
    assert teacher.decode(expected).endswith("<|im_start|>assistant\n")


def test_failed_request_is_recorded_and_the_job_still_succeeds(api, start_worker):
    body = batch(3)
    body["requests"][1] = {"custom_id": "bad", "prompt_token_ids": [1, 4242]}
    job = api.post("/v1/jobs", json=body).json()
    start_worker(ScriptedEngine(fail_tokens=frozenset({4242})))
    job = wait_for(api, job["id"])
    assert job["status"] == "succeeded"
    assert job["counts"]["failed"] == 1 and job["counts"]["completed"] == 2
    errors = api.get(f"/v1/jobs/{job['id']}/errors").json()["errors"]
    assert [e["custom_id"] for e in errors] == ["bad"] and "scripted failure" in errors[0]["error"]
    rows = download_rows(api, job)
    bad = [r for r in rows if r["custom_id"] == "bad"]
    assert len(bad) == 1 and bad[0]["finish_reason"] == "error" and bad[0]["completion_token_ids"] == []


def test_shard_download_honours_range_and_sends_etag(api, start_worker):
    job = api.post("/v1/jobs", json=batch(3)).json()
    start_worker(ScriptedEngine())
    shard = wait_for(api, job["id"])["shards"][0]
    full = api.get(shard["url"])
    assert full.headers["etag"] == f'"{shard["sha256"]}"'
    assert int(full.headers["content-length"]) == shard["bytes"] == len(full.content)
    part = api.get(shard["url"], headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == full.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{shard['bytes']}"


@pytest.mark.parametrize(
    "change, status, field",
    [
        ({"teacher": "no-such-teacher"}, 404, "teacher"),
        ({"requests": []}, 422, "requests"),
        ({"top_logprobs": 21}, 422, "top_logprobs"),
        ({"requests": [{"prompt": "ok"}, {"prompt": 5}]}, 422, "requests[1].prompt"),
        ({"requests": [{"prompt": "ok"}, {"prompt_token_ids": [1, 10**6]}]}, 422, "requests[1].prompt_token_ids"),
        ({"requests": [{"prompt": "ok"}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}]}, 422, "requests[1].prompt"),
        ({"requests": [{"prompt": "x " * 3000}]}, 422, "requests[0].prompt"),
        ({"sampling": {"max_tokens": 0}}, 422, "sampling.max_tokens"),
        ({"requests": [{"custom_id": "a", "prompt": "x"}, {"custom_id": "a", "prompt": "y"}]}, 422, "requests[1].custom_id"),
    ],
)
def test_bad_submissions_are_rejected_and_create_nothing(api, change, status, field):
    response = api.post("/v1/jobs", json={**batch(2), **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    assert api.get("/v1/jobs").json()["data"] == []


def test_status_moves_and_list_pages_newest_first(api, start_worker):
    ids = [api.post("/v1/jobs", json=batch(1)).json()["id"] for _ in range(3)]
    page = api.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = api.get("/v1/jobs", params={"limit": 2, "after": page["next"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]


def test_teachers_health_and_metrics(api, start_worker):
    teachers = api.get("/v1/teachers").json()["data"]
    assert teachers[0]["name"] == TEACHER and teachers[0]["vocab_size"] == 49152
    assert teachers[0]["max_top_logprobs"] == 20 and teachers[0]["tokenizer_hash"].startswith("sha256:")
    assert api.get("/healthz").json() == {"status": "ok"}
    job = api.post("/v1/jobs", json=batch(3)).json()
    worker = start_worker(ScriptedEngine())
    wait_for(api, job["id"])
    worker.stop()
    metrics = api.get("/metrics").text
    assert "teachercache_engine_requests_total 3.0" in metrics
    assert 'teachercache_jobs{state="succeeded"} 1.0' in metrics
