"""Worker churn fails no innocent request, and suspects run (alone) within bounded time under load."""

from __future__ import annotations

import time

import sqlalchemy as sa

from service.db import transaction
from service.models import Request, Task
from service.queue.repository import TaskRepository
from tests.integration.test_pipeline_scripted import batch
from tests.jobs import wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"


def claim(rt, owner: str, suspect: bool = False, lease_s: float = 0.2, limit: int = 10):
    with transaction(rt.sessions) as db:
        return TaskRepository(db).claim(TEACHER, owner, limit, lease_s, suspect)


def task_row(rt, key: str) -> Task:
    with rt.sessions() as db:
        return db.get(Task, key)


def test_a_lease_lost_among_other_tasks_does_not_count_an_attempt(api, rt):
    api.post("/v1/jobs", json=batch(1))
    [task] = claim(rt, "dies")
    time.sleep(0.3)  # the worker died with it among its tasks: the lease expires
    assert claim(rt, "normal") == []  # it lost its lease among others: it now runs only alone
    row = task_row(rt, task.key)
    assert row.suspect and row.attempts == 0 and row.state == "pending"
    assert "not counted" in row.errors[-1]["error"]


def test_a_task_that_kills_the_workers_it_runs_alone_on_still_fails(api, rt):
    api.post("/v1/jobs", json=batch(1))
    [first] = claim(rt, "among-others")
    time.sleep(0.3)
    claim(rt, "normal")  # requeues it as a suspect
    for round_ in range(first.max_attempts):
        assert len(claim(rt, f"alone-{round_}", suspect=True)) == 1
        time.sleep(0.3)  # and every worker it runs alone on dies
    assert claim(rt, "alone-again", suspect=True) == []  # out of attempts
    with transaction(rt.sessions) as db:  # the app's finalizer thread may have expired it already
        assert TaskRepository(db).expire_exhausted() in ([first.key], [])
    row = task_row(rt, first.key)
    assert row.state == "failed" and row.attempts == first.max_attempts


def test_a_suspect_runs_alone_within_bounded_time_under_steady_load(api, rt, start_worker):
    # Score requests of different lengths finish at different steps, so the worker, topping up
    # as they finish, never runs empty by itself.
    requests = [{"custom_id": f"l{i}", "prompt_token_ids": [1, 2, 3 + i],
                 "response_token_ids": list(range(1, 6 + (i * 7) % 75))} for i in range(400)]
    load = api.post("/v1/jobs", json={"mode": "score", "requests": requests}).json()
    start_worker(ScriptedEngine(step_delay_s=0.01, tokens_per_step=1), max_inflight=16)
    deadline = time.monotonic() + 30
    while api.get(f"/v1/jobs/{load['id']}").json()["counts"]["completed"] < 20:  # under load now
        assert time.monotonic() < deadline
        time.sleep(0.05)
    suspect_job = api.post("/v1/jobs", json={"requests": [{"custom_id": "s", "prompt": "the suspect"}]}).json()
    with transaction(rt.sessions) as db:
        key = db.scalar(sa.select(Request.cache_key).where(Request.job_id == suspect_job["id"]))
        db.execute(sa.update(Task).where(Task.key == key).values(suspect=True))
    done = wait_for(api, suspect_job["id"], timeout=30)
    assert done["status"] == "succeeded" and done["counts"]["completed"] == 1
    assert api.get(f"/v1/jobs/{load['id']}").json()["status"] != "succeeded"  # the load was still running
    wait_for(api, load["id"], timeout=120)
