"""Retention with the scripted engine and a real Postgres: finished jobs expire the way DELETE
removes them (the cache stays), and the cache keeps to its budget, least recently used first,
never evicting an entry an unfinished job still needs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import sqlalchemy as sa

import service.jobs.repository as jobs_repository
import service.queue.repository as queue_repository
import service.results.repository as results_repository
from service.models import Job, Request, Result, Shard, Task
from service.results.retention import evict_entries, expire_jobs, purge_idle_tasks, sweep
from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"


def batch(tag: str, n: int = 4) -> dict:
    return {"teacher": TEACHER, "top_logprobs": 3, "sampling": {"max_tokens": 6},
            "requests": [{"custom_id": f"{tag}{i}", "prompt_token_ids": [7, 8, sum(map(ord, tag)), i]}
                         for i in range(n)]}


@pytest.fixture
def settings(settings):
    # The finalizer loop sweeps once when it starts, then not again during a test: the tests
    # call the sweep themselves, so each sees exactly its own round.
    # Jobs of over 10 requests are deleted in chunks (the API's DELETE too).
    return settings.model_copy(update={"retention_sweep_s": 3600.0, "retention_delete_rows": 10})


@pytest.fixture
def with_settings(rt):
    """A runtime on the same database and storage with other retention settings."""
    made = []

    def make(**update):
        other = replace(rt, settings=rt.settings.model_copy(update=update))
        made.append(other)
        return other

    yield make
    for other in made:
        other.engine.dispose()


def run_job(api, body: dict) -> dict:
    return wait_for(api, api.post("/v1/jobs", json=body).json()["id"])


def entry_keys(rt, tag: str) -> set[str]:
    """The cache keys a batch's requests were answered from (the requests of any job of it)."""
    with rt.sessions() as db:
        return set(db.scalars(sa.select(Request.result_key).where(Request.custom_id.like(f"{tag}%"),
                                                                  Request.result_key.is_not(None))))


def all_entries(rt) -> set[str]:
    with rt.sessions() as db:
        return set(db.scalars(sa.select(Result.cache_key)))


def age(rt, statement) -> None:
    with rt.sessions() as db, db.begin():
        db.execute(statement)


def test_an_expired_job_goes_with_its_shards_and_its_resubmission_is_answered_from_the_cache(api, rt,
                                                                                                start_worker):
    start_worker(ScriptedEngine())
    job = run_job(api, batch("x"))
    rows = download_rows(api, job)
    with rt.sessions() as db:
        paths = list(db.scalars(sa.select(Shard.path).where(Shard.job_id == job["id"])))
    assert paths and all(rt.storage.stat(p) is not None for p in paths)
    fresh = run_job(api, batch("y"))  # ended just now: inside the retention time
    age(rt, sa.update(Job).where(Job.id == job["id"]).values(finished_at=sa.func.now() - sa.text("interval '31 days'")))
    entries = all_entries(rt)

    assert expire_jobs(rt) == 1
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert all(rt.storage.stat(p) is None for p in paths)
    with rt.sessions() as db:
        assert db.scalar(sa.select(sa.func.count()).select_from(Request).where(Request.job_id == job["id"])) == 0
    assert api.get(f"/v1/jobs/{fresh['id']}").json()["status"] == "succeeded"
    assert all_entries(rt) == entries  # the cache is kept
    again = run_job(api, batch("x"))
    assert again["counts"]["cached"] == 4
    assert [r["completion_token_ids"] for r in download_rows(api, again)] == \
        [r["completion_token_ids"] for r in rows]


def request_rows(rt, job_id: str) -> int:
    with rt.sessions() as db:
        return db.scalar(sa.select(sa.func.count()).select_from(Request).where(Request.job_id == job_id))


def test_an_expired_huge_job_is_hidden_at_once_then_deleted_in_bounded_resumable_chunks(
        api, rt, start_worker, with_settings):
    start_worker(ScriptedEngine())
    job = run_job(api, batch("h", n=25))
    with rt.sessions() as db:
        paths = list(db.scalars(sa.select(Shard.path).where(Shard.job_id == job["id"])))
    entries = all_entries(rt)
    age(rt, sa.update(Job).where(Job.id == job["id"]).values(finished_at=sa.func.now() - sa.text("interval '31 days'")))
    chunked = with_settings(retention_delete_rows=10, retention_delete_chunks=1)

    first = sweep(chunked)
    assert (first.jobs, first.request_rows) == (1, 10)
    # Gone for its tenant at once, shards included; its rows go a chunk per round.
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert job["id"] not in [j["id"] for j in api.get("/v1/jobs").json()["data"]]
    assert all(rt.storage.stat(p) is None for p in paths)
    assert request_rows(rt, job["id"]) == 15
    assert sweep(chunked).request_rows == 10  # a later round (or another process) resumes it
    assert request_rows(rt, job["id"]) == 5
    last = sweep(chunked)
    assert (last.jobs, last.request_rows) == (0, 5)
    with rt.sessions() as db:
        assert db.get(Job, job["id"]) is None
        assert db.scalar(sa.select(sa.func.count()).select_from(Shard).where(Shard.job_id == job["id"])) == 0
    assert sweep(chunked) == type(last)()
    assert all_entries(rt) == entries  # the cache is kept
    assert run_job(api, batch("h", n=25))["counts"]["cached"] == 25


def test_deleting_a_job_bigger_than_a_chunk_through_the_api_hides_it_and_the_sweep_finishes_it(
        api, rt, start_worker, with_settings):
    start_worker(ScriptedEngine())
    job = run_job(api, batch("d", n=12))
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 200  # 12 requests: over the 10 of a chunk
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert request_rows(rt, job["id"]) == 12
    chunked = with_settings(retention_delete_rows=5, retention_delete_chunks=2)
    assert sweep(chunked).request_rows == 10
    assert sweep(chunked).request_rows == 2
    with rt.sessions() as db:
        assert db.get(Job, job["id"]) is None


def test_an_unfinished_job_never_expires_and_zero_keeps_jobs_forever(api, rt, with_settings):
    queued = api.post("/v1/jobs", json=batch("q")).json()["id"]  # no worker: it never ends
    age(rt, sa.update(Job).where(Job.id == queued).values(
        status="running", created_at=sa.func.now() - sa.text("interval '90 days'"),
        started_at=sa.func.now() - sa.text("interval '90 days'")))
    assert expire_jobs(rt) == 0
    assert api.get(f"/v1/jobs/{queued}").json()["status"] == "running"

    age(rt, sa.update(Job).where(Job.id == queued).values(
        status="cancelled", finished_at=sa.func.now() - sa.text("interval '90 days'")))
    assert expire_jobs(with_settings(job_retention_s=0)) == 0
    assert expire_jobs(with_settings(job_retention_s=None)) == 0
    assert expire_jobs(rt) == 1


def test_lru_eviction_goes_from_the_least_recently_used_in_bounded_rounds_and_keeps_recent_hits(
        api, rt, start_worker, with_settings):
    start_worker(ScriptedEngine())
    for tag in ("a", "b", "c"):
        run_job(api, batch(tag))
    a, b, c = entry_keys(rt, "a"), entry_keys(rt, "b"), entry_keys(rt, "c")
    with rt.sessions() as db:
        b_shards = set(db.scalars(sa.select(Shard.path).join(Result, Result.shard_id == Shard.id)
                                  .where(Result.cache_key.in_(b))))
    # Last used: b three hours ago, c two, a one; then a hit on b makes it the most recent.
    for keys, hours in ((b, 3), (c, 2), (a, 1)):
        age(rt, sa.update(Result).where(Result.cache_key.in_(keys))
            .values(last_used_at=sa.func.now() - sa.text(f"interval '{hours} hours'")))
    hit = run_job(api, batch("b"))
    assert hit["counts"]["cached"] == 4
    budget = with_settings(cache_max_entries=8, retention_batch=3)

    assert evict_entries(budget) == 3  # bounded: at most retention_batch a round
    assert a | b <= all_entries(rt) and len(all_entries(rt) & c) == 1
    assert evict_entries(budget) == 1
    assert all_entries(rt) == a | b  # c (least recently used) went; the recent hit on b kept it
    assert evict_entries(budget) == 0
    assert all(rt.storage.stat(p) is not None for p in b_shards)

    # c's result shard lost its last entry: its row and object are gone; c is computed again.
    with rt.sessions() as db:
        assert db.scalar(sa.select(sa.func.count()).select_from(Task).where(Task.key.in_(c))) == 0
        assert len(db.scalars(sa.select(Shard).where(Shard.kind == "result")).all()) == 2
    again = run_job(api, batch("c"))
    assert again["status"] == "succeeded" and again["counts"]["cached"] == 0 and again["counts"]["completed"] == 4


def test_entries_unused_for_longer_than_the_idle_budget_are_evicted(api, rt, start_worker, with_settings):
    start_worker(ScriptedEngine())
    run_job(api, batch("old"))
    run_job(api, batch("new"))
    old, new = entry_keys(rt, "old"), entry_keys(rt, "new")
    age(rt, sa.update(Result).where(Result.cache_key.in_(old))
        .values(last_used_at=sa.func.now() - sa.text("interval '2 days'")))
    assert evict_entries(with_settings(cache_max_idle_s=24 * 3600.0)) == 4
    assert all_entries(rt) == new


def test_an_entry_an_unfinished_job_needs_is_never_evicted(api, rt, start_worker, with_settings):
    worker = start_worker(ScriptedEngine())
    run_job(api, batch("n"))
    worker.stop()
    needed = entry_keys(rt, "n")
    body = batch("n")
    body["requests"].append({"custom_id": "n-new", "prompt_token_ids": [9, 9, 9]})
    waiting = api.post("/v1/jobs", json=body).json()  # 4 answered from the cache, 1 pending: running
    assert waiting["counts"]["cached"] == 4 and waiting["counts"]["pending"] == 1
    age(rt, sa.update(Result).values(last_used_at=sa.func.now() - sa.text("interval '1 day'")))

    nothing = with_settings(cache_max_entries=0, cache_max_idle_s=60.0)
    assert sweep(nothing).entries == 0
    assert needed <= all_entries(rt)
    start_worker(ScriptedEngine())
    done = wait_for(api, waiting["id"])
    assert done["status"] == "succeeded"
    rows = download_rows(api, done)
    assert [r["cached"] for r in rows] == [True] * 4 + [False] and not any(r["error"] for r in rows)
    # Once the job has its shards, nothing needs the entries any more.
    age(rt, sa.update(Result).values(last_used_at=sa.func.now() - sa.text("interval '1 day'")))
    assert sweep(nothing).entries == 5
    assert download_rows(api, done) == rows  # a job shard is a copy: it keeps its rows


def result_shards_of(rt, keys: set[str]) -> dict[str, int]:
    """The result shards (path: stored bytes) that hold these entries."""
    with rt.sessions() as db:
        return dict(db.execute(sa.select(Shard.path, Shard.bytes).join(Result, Result.shard_id == Shard.id)
                               .where(Result.cache_key.in_(keys)).distinct()).all())


def cache_bytes(rt) -> int:
    with rt.sessions() as db:
        return results_repository.ResultRepository(db).cache_bytes()


def test_the_byte_budget_evicts_least_recently_used_entries_until_their_shards_are_reclaimed(
        api, rt, start_worker, with_settings):
    start_worker(ScriptedEngine())
    for tag in ("a", "b", "c"):
        run_job(api, batch(tag))
    a, b, c = entry_keys(rt, "a"), entry_keys(rt, "b"), entry_keys(rt, "c")
    shards = {tag: result_shards_of(rt, keys) for tag, keys in (("a", a), ("b", b), ("c", c))}
    with rt.sessions() as db:
        every_shard = dict(db.execute(sa.select(Shard.path, Shard.bytes).where(Shard.kind == "result")).all())
    # The counter the trigger keeps is the result shards' stored size, exactly.
    assert cache_bytes(rt) == sum(every_shard.values()) == sum(sum(s.values()) for s in shards.values())
    for keys, hours in ((a, 3), (b, 2), (c, 1)):  # a least recently used, then b, then c
        age(rt, sa.update(Result).where(Result.cache_key.in_(keys))
            .values(last_used_at=sa.func.now() - sa.text(f"interval '{hours} hours'")))
    # Room for b's and c's shards but not a's as well: a's entries go, in passes of at most 3.
    budget = with_settings(cache_max_bytes=sum(shards["b"].values()) + sum(shards["c"].values()),
                           retention_batch=3)

    assert evict_entries(budget) == 3  # bounded: a's shard still holds one entry, its bytes stay
    assert cache_bytes(rt) == sum(every_shard.values())
    assert all(rt.storage.stat(p) is not None for p in shards["a"])
    assert evict_entries(budget) == 1  # its last entry: the shard's row and object go
    assert all_entries(rt) == b | c
    assert all(rt.storage.stat(p) is None for p in shards["a"])
    assert cache_bytes(rt) == sum(shards["b"].values()) + sum(shards["c"].values())
    assert evict_entries(budget) == 0  # within budget now
    assert all(rt.storage.stat(p) is not None for s in (shards["b"], shards["c"]) for p in s)
    again = run_job(api, batch("b"))
    assert again["counts"]["cached"] == 4


def test_old_idle_tasks_are_deleted_in_bounded_rounds_and_a_resubmission_queues_them_again(
        api, rt, start_worker, with_settings):
    cancelled = api.post("/v1/jobs", json=batch("idle", 5)).json()
    api.post(f"/v1/jobs/{cancelled['id']}/cancel")
    young = api.post("/v1/jobs", json=batch("young", 2)).json()
    api.post(f"/v1/jobs/{young['id']}/cancel")
    age(rt, sa.text("UPDATE tasks SET created_at = now() - interval '2 days' WHERE state = 'idle' "
                    "AND prompt_token_ids[3] = " + str(sum(map(ord, "idle")))))

    def idle_count() -> int:
        with rt.sessions() as db:
            return db.scalar(sa.select(sa.func.count()).select_from(Task).where(Task.state == "idle"))

    assert idle_count() == 7
    bounded = with_settings(idle_task_retention_s=86400.0, retention_batch=3)
    assert [purge_idle_tasks(bounded) for _ in range(4)] == [3, 2, 0, 0]
    assert idle_count() == 2  # the young ones stay
    assert purge_idle_tasks(with_settings(idle_task_retention_s=0)) == 0  # 0 keeps them
    start_worker(ScriptedEngine())
    again = run_job(api, batch("idle", 5))
    assert again["status"] == "succeeded" and again["counts"]["completed"] == 5
    assert len(download_rows(api, again)) == 5


@pytest.mark.parametrize("statement, params, index", [
    (jobs_repository.EXPIRED_JOBS_SQL, {"retention_s": 86400, "limit": 10}, "ix_jobs_finished_at"),
    (results_repository.EVICTABLE_SQL, {"idle_s": 0, "limit": 10}, "ix_results_last_used_at"),
    (results_repository.OVER_BUDGET_SQL, {"max_entries": 1000, "limit": 10}, "ix_results_last_used_at"),
    (results_repository.LRU_SHARES_SQL, {"limit": 10}, "ix_results_last_used_at"),
    (jobs_repository.DELETING_JOBS_SQL, {"limit": 10}, "ix_jobs_status"),
    (jobs_repository.DELETE_REQUESTS_CHUNK_SQL, {"job_id": "j", "rows": 10}, "requests_job_id"),
    (results_repository.USE_RESULTS_SQL, {"keys": "k2-a,k2-b", "resolution_s": 60}, "pk_results"),
    (queue_repository.DELETE_IDLE_TASKS_SQL, {"age_s": 86400, "limit": 10}, "ix_tasks_idle"),
])
def test_the_sweep_and_the_hit_lookup_are_index_scans(rt, statement, params, index):
    """Never a whole-table scan: each statement has an index path (the planner is told to avoid
    sequential scans, as it would on a table of 10^7 rows; these tables are empty)."""
    with rt.sessions() as db, db.begin():
        db.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(db.execute(sa.text(f"EXPLAIN {statement.text}"), params).scalars())
    assert "Seq Scan" not in plan and index in plan, plan
