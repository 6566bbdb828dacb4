"""Leases, fencing, attempts, idempotency, cancellation and shard integrity (scripted engine,
real Postgres). Fault injection with real worker processes is in test_faults.py."""

from __future__ import annotations

import concurrent.futures
import time

import sqlalchemy as sa

from service.db import transaction
from service.models import Job, Task
from service.queue.repository import TaskRepository
from tests.integration.test_pipeline_scripted import batch
from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"


def claim(rt, owner: str, lease_s: float = 60, limit: int = 10, suspect: bool = False):
    with transaction(rt.sessions) as db:
        return TaskRepository(db).claim(TEACHER, owner, limit, lease_s, suspect)


def test_an_expired_lease_is_reclaimed_with_a_new_token_and_the_stale_holder_cannot_commit(api, rt):
    api.post("/v1/jobs", json=batch(1))
    [first] = claim(rt, "worker-a", lease_s=0.2)
    assert claim(rt, "worker-b") == []  # leased, not expired: not handed out twice
    time.sleep(0.3)
    # Lost among others, it comes back as a suspect (run alone) with that attempt given back.
    [second] = claim(rt, "worker-b", suspect=True)
    assert second.key == first.key and second.lease_token > first.lease_token and second.attempts == 1
    with transaction(rt.sessions) as db:
        repo = TaskRepository(db)
        assert repo.renew({first.key: first.lease_token}, 60) == set()  # the stale holder learns it lost
        assert repo.finish({first.key: first.lease_token}) == set()  # and cannot commit
        assert repo.finish({second.key: second.lease_token}) == {second.key}


def test_a_request_that_fails_every_attempt_fails_alone_with_its_reasons(api, start_worker, rt):
    body = batch(3)
    body["requests"][1] = {"custom_id": "poison", "prompt_token_ids": [1, 4242]}
    job = api.post("/v1/jobs", json=body).json()
    start_worker(ScriptedEngine(fail_tokens=frozenset({4242})))
    job = wait_for(api, job["id"])
    assert job["status"] == "succeeded" and job["counts"]["failed"] == 1 and job["counts"]["completed"] == 2
    [error] = api.get(f"/v1/jobs/{job['id']}/errors").json()["errors"]
    assert error["custom_id"] == "poison" and error["error"].count("scripted failure") == 3  # one reason per attempt
    with rt.sessions() as db:
        attempts = db.scalar(sa.select(sa.func.max(Task.attempts)))
    assert attempts == 3


def test_retried_submission_with_the_same_key_returns_the_same_job(api):
    headers = {"Idempotency-Key": "batch-42"}
    first = api.post("/v1/jobs", json=batch(2), headers=headers)
    again = api.post("/v1/jobs", json=batch(2), headers=headers)
    assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    different = api.post("/v1/jobs", json=batch(3), headers=headers)
    assert different.status_code == 422 and different.json()["error"]["field"] == "Idempotency-Key"


def test_fifty_parallel_identical_posts_create_one_job(api, rt):
    def post(_):
        return api.post("/v1/jobs", json=batch(4), headers={"Idempotency-Key": "parallel"})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(50)))
    ids = {r.json()["id"] for r in responses if r.status_code in (200, 201)}
    assert len(ids) == 1
    assert {r.status_code for r in responses} <= {200, 201, 409}
    assert sum(r.status_code == 201 for r in responses) == 1
    with rt.sessions() as db:
        assert db.scalar(sa.select(sa.func.count()).select_from(Job)) == 1


def test_cancel_stops_handing_out_work_and_keeps_what_was_done(api, start_worker, rt):
    first = api.post("/v1/jobs", json=batch(2)).json()
    # Slow steps: the idle worker is told of the next job at once (service/notify.py) and claims
    # it; the cancel must come while its requests still run, not after they finished.
    start_worker(ScriptedEngine(step_delay_s=0.5))
    wait_for(api, first["id"])  # both prompts are in the cache now
    body = batch(6)
    job = api.post("/v1/jobs", json=body).json()
    assert job["counts"]["cached"] == 2
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    job = wait_for(api, job["id"])
    assert job["status"] == "cancelled" and job["counts"]["cancelled"] == cancelled["counts"]["cancelled"]
    rows = download_rows(api, job)
    assert len({r["request_index"] for r in rows}) == 6  # every request present, cancelled ones as errors
    done = [r for r in rows if r["error"] is None]
    assert len(done) >= 4 and all(r["cached"] for r in done[:4])
    assert claim(rt, "late-worker") == []  # nothing of the cancelled job is claimable


def test_a_corrupted_shard_is_refused_not_served(api, start_worker, rt):
    job = api.post("/v1/jobs", json=batch(2)).json()
    start_worker(ScriptedEngine())
    shard = wait_for(api, job["id"])["shards"][0]
    assert api.get(shard["url"]).status_code == 200
    path = next((rt.storage.local_root / "jobs" / job["id"]).glob("*.parquet"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    response = api.get(shard["url"])
    assert response.status_code == 500 and response.json()["error"]["code"] == "shard_damaged"


def test_an_engine_that_dies_makes_the_worker_exit_non_zero_and_release_its_leases(api, start_worker, rt):
    job = api.post("/v1/jobs", json={**batch(1), "requests": [{"prompt_token_ids": [1, 777]}]}).json()
    worker = start_worker(ScriptedEngine(crash_tokens=frozenset({777})))
    worker.thread.join(30)
    assert worker.exit_code == 1
    with rt.sessions() as db:
        task = db.scalar(sa.select(Task))
    assert task.state == "pending" and task.lease_owner is None  # released for another worker
    start_worker(ScriptedEngine())
    assert wait_for(api, job["id"])["counts"]["completed"] == 1


def test_a_request_that_kills_the_engine_fails_alone_and_its_neighbours_succeed(api, start_worker, rt):
    body = {**batch(1), "requests": [{"custom_id": f"r{i}", "prompt_token_ids": [1, 50 + i]} for i in range(4)]}
    body["requests"][2] = {"custom_id": "killer", "prompt_token_ids": [1, 777]}
    job = api.post("/v1/jobs", json=body).json()
    exit_codes = []
    for _ in range(8):  # a supervisor restarting the worker each time its engine dies
        worker = start_worker(ScriptedEngine(crash_tokens=frozenset({777})))
        worker.thread.join(10)
        if worker.exit_code is None:
            break
        exit_codes.append(worker.exit_code)
    job = wait_for(api, job["id"])
    assert exit_codes == [1, 1, 1]  # the first crash in a batch, then two alone; the neighbours never again
    assert job["counts"]["completed"] == 3 and job["counts"]["failed"] == 1
    [error] = api.get(f"/v1/jobs/{job['id']}/errors").json()["errors"]
    assert error["custom_id"] == "killer"


def test_claims_are_bounded_by_tokens_as_well_as_requests(rt):
    from service.queue.repository import ClaimedTask
    from workers.loop import WorkerLoop
    from workers.settings import WorkerSettings

    settings = WorkerSettings(**{**rt.settings.model_dump(), "max_inflight": 100, "max_inflight_tokens": 1000})
    loop = WorkerLoop(rt, ScriptedEngine(), settings, TEACHER)
    assert loop._room() == 100
    long_score = dict(mode="score", sampling={}, top_logprobs=5, attempts=1, max_attempts=3, lease_token=1)
    loop.held.add([ClaimedTask(key=f"k{i}", prompt_token_ids=[1] * 100, response_token_ids=[2] * 200, **long_score)
                   for i in range(3)])
    assert loop.held.token_count() == 900
    assert loop._room() == 0  # 100 tokens left: not enough for another 300-token request
