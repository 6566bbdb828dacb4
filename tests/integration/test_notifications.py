"""Finalizers and claimers wait on Postgres notifications (service/notify.py) instead of polling,
with the scripted engine (the control plane only) on a real Postgres:

- a job is claimed and assembled at once although both fallback polls are a minute long;
- an idle worker and API run a handful of statements a second, not a claim every 0.2 s and a
  finalizer query every 0.1 s;
- a listening connection that is cut comes back, and work still flows meanwhile.
"""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from service.notify import JOBS_READY, TASKS_QUEUED, Listener
from tests.jobs import wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"
MINUTE = 60.0


@pytest.fixture
def settings(settings):
    """Fallback polls of a minute: anything faster than that came from a notification."""
    return settings.model_copy(update={"finalizer_idle_poll_s": MINUTE})


def job_body(n: int = 4) -> dict:
    return {"teacher": TEACHER, "top_logprobs": 2, "sampling": {"max_tokens": 4},
            "requests": [{"custom_id": f"r{i}", "prompt_token_ids": [1, 2, i + 10]} for i in range(n)]}


def idle_worker(rt, start_worker, **overrides):
    worker = start_worker(ScriptedEngine(), **{"claim_idle_poll_s": MINUTE, **overrides})
    assert rt.listener.wait_connected(10), "the listening connection did not come up"
    time.sleep(1.0)  # its first claim found nothing: it is in its long wait now
    return worker


def test_a_job_is_claimed_and_assembled_when_notified_not_when_polled(rt, api, start_worker):
    idle_worker(rt, start_worker)
    started = time.monotonic()
    job = wait_for(api, api.post("/v1/jobs", json=job_body()).json()["id"], timeout=MINUTE / 3)
    assert job["status"] == "succeeded" and job["counts"]["completed"] == 4
    assert time.monotonic() - started < MINUTE / 3


def test_a_worker_is_ready_once_registered_and_listening(rt, start_worker):
    worker = start_worker(ScriptedEngine(), claim_idle_poll_s=MINUTE)
    assert worker.loop.ready.wait(10), "the worker never said it was ready"
    assert rt.listener.connected  # a job queued from now on wakes its claimer at once
    with rt.engine.connect() as db:
        registered = db.scalar(sa.text("SELECT count(*) FROM workers WHERE id = :id"), {"id": worker.loop.worker_id})
    assert registered == 1


def test_an_idle_worker_and_api_run_a_few_statements_not_a_poll_each_tick(rt, api, start_worker):
    idle_worker(rt, start_worker, claim_idle_poll_s=2.0)
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        statements.append(statement.split(None, 3)[:3])

    sa.event.listen(rt.engine, "before_cursor_execute", count)
    try:
        time.sleep(4.0)
    finally:
        sa.event.remove(rt.engine, "before_cursor_execute", count)
    # Polling (a claim every claim_poll_s 0.2 s, two finalizers every finalizer_poll_s 0.1 s)
    # ran about 20 x 3 + 40 x 2 = 140 statements in 4 s; waiting on notifications, the claimer
    # looks every 2 s and each finalizer's reconcile runs every 2 s.
    assert len(statements) <= 30, statements


def test_a_cut_listening_connection_comes_back_and_work_flows_meanwhile(rt, api, start_worker):
    idle_worker(rt, start_worker, claim_idle_poll_s=2.0)
    with rt.engine.connect() as db:
        cut = db.scalar(sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"))
    assert cut == 1
    job = wait_for(api, api.post("/v1/jobs", json=job_body()).json()["id"], timeout=MINUTE / 3)
    assert job["status"] == "succeeded"
    assert rt.listener.wait_connected(10)


def test_notifications_reach_only_their_channel_and_teacher(rt):
    """The queue's statements announce the teacher; a subscriber of another teacher sleeps on,
    one of ANY wakes; JOBS_READY comes from the trigger on jobs entering finalizing."""
    listener = Listener(rt.database_url)
    mine, other, ready = threading.Event(), threading.Event(), threading.Event()
    listener.subscribe(TASKS_QUEUED, mine, TEACHER)
    listener.subscribe(TASKS_QUEUED, other, "another-teacher")
    listener.subscribe(JOBS_READY, ready)
    try:
        assert listener.wait_connected(10)
        time.sleep(0.2)
        for event in (mine, other, ready):
            event.clear()  # each was set once on connecting (anything before was missed)
        with rt.engine.begin() as db:
            db.execute(sa.text("SELECT pg_notify(:c, :p)"), {"c": TASKS_QUEUED, "p": TEACHER})
        assert mine.wait(5) and not other.wait(0.5) and not ready.is_set()
    finally:
        for event in (mine, other, ready):
            listener.unsubscribe(event)
    assert not listener.connected  # the last unsubscribe closed it


def test_a_job_entering_finalizing_notifies_jobs_ready(rt, api):
    listener = Listener(rt.database_url)
    ready = threading.Event()
    listener.subscribe(JOBS_READY, ready)
    try:
        assert listener.wait_connected(10)
        time.sleep(0.2)
        job = api.post("/v1/jobs", json=job_body(2)).json()
        ready.clear()
        assert not ready.wait(0.5)  # queued, nothing ready
        assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200  # cancelled jobs finalize too
        assert ready.wait(5)
    finally:
        listener.unsubscribe(ready)


def test_jobs_ready_names_the_job_so_a_waiter_of_another_job_sleeps_on(rt, api):
    listener = Listener(rt.database_url)
    mine, other = threading.Event(), threading.Event()
    job = api.post("/v1/jobs", json=job_body(2)).json()
    listener.subscribe(JOBS_READY, mine, job["id"])
    listener.subscribe(JOBS_READY, other, "job_not_this_one")
    try:
        assert listener.wait_connected(10)
        time.sleep(0.2)
        mine.clear(), other.clear()  # the connection's own wake-up
        assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        assert mine.wait(5)
        assert not other.wait(0.5)
    finally:
        listener.unsubscribe(mine)
        listener.unsubscribe(other)


def test_an_online_request_is_woken_by_its_jobs_notification_not_by_its_poll(rt, api, start_worker, monkeypatch):
    """The synchronous endpoint's wait (service/online): with both of its polls a minute long,
    the answer comes as soon as Postgres says the job is ready, after a couple of counter reads."""
    from service.online.service import OnlineService

    monkeypatch.setattr(rt.settings, "online_poll_s", MINUTE)
    monkeypatch.setattr(rt.settings, "online_idle_poll_s", MINUTE)
    reads = []
    pending = OnlineService.pending
    monkeypatch.setattr(OnlineService, "pending", lambda self, ids: reads.append(ids) or pending(self, ids))
    idle_worker(rt, start_worker)
    started = time.monotonic()
    response = api.post("/v1/completions", json={"model": TEACHER, "prompt": [1, 2, 3, 4], "max_tokens": 0,
                                                 "echo": True, "logprobs": 2})
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < MINUTE / 3
    assert 2 <= len(reads) <= 4  # before the wait, then on the notification (or two: folded or not)
