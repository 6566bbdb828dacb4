"""The control plane does work in proportion to what changed (issue 16): counters kept on the
job row agree with a recount after a mixed run, cancelled jobs' tasks leave the queue, reconcile
touches nothing when nothing changed, and claims take turns across jobs (round-robin by job)."""

from __future__ import annotations

import re
import time

import pytest
import sqlalchemy as sa

from service.db import transaction
from service.jobs.finalizer import reconcile_in
from service.models import Job, Request, Task
from service.queue.repository import CLAIM_SQL, TaskRepository
from tests.counters import recount, recount_spend, waiters_disagreeing
from tests.integration.test_tenants import limited  # noqa: F401 (a fixture)
from tests.jobs import wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"
FAIL = 4242


def body(ids, cache: str = "use", **extra) -> dict:
    requests = [{"custom_id": f"r{n}-{i}", "prompt_token_ids": [1, 2, i]} for n, i in enumerate(ids)]
    return {"teacher": TEACHER, "top_logprobs": 3, "sampling": {"max_tokens": 4}, "requests": requests,
            "cache": cache, **extra}


def claim(rt, owner: str, limit: int):
    with transaction(rt.sessions) as db:
        return TaskRepository(db).claim(TEACHER, owner, limit, 30.0)


def task_states(rt, job_id: str) -> set[str]:
    with rt.sessions() as db:
        keys = sa.select(Request.cache_key).where(Request.job_id == job_id)
        return set(db.scalars(sa.select(Task.state).where(Task.key.in_(keys))))


def assert_counters_agree(rt, job_ids) -> None:
    with rt.sessions() as db:
        for job_id in job_ids:
            job = db.get(Job, job_id)
            kept = {"pending": job.n_pending, "completed": job.n_completed, "cached": job.n_cached,
                    "failed": job.n_failed, "cancelled": job.n_cancelled, "total": job.total}
            assert kept == recount(db, job_id), job_id
            assert recount_spend(db, job_id) == {False: (job.sent_prompt_tokens, job.sent_completion_tokens),
                                                 True: (job.cached_prompt_tokens, job.cached_completion_tokens)}
        assert waiters_disagreeing(db) == []


# -- 4: cancelled jobs' tasks ----------------------------------------------------------------
def test_a_cancelled_jobs_tasks_are_not_claimed_not_pending_and_come_back_when_asked_again(api, rt):
    cancelled = api.post("/v1/jobs", json=body(range(20))).json()
    shared = api.post("/v1/jobs", json=body([0, 1])).json()  # two of its keys are also waited on here
    api.post(f"/v1/jobs/{cancelled['id']}/cancel")
    assert task_states(rt, cancelled["id"]) == {"idle", "pending"}
    with rt.sessions() as db:
        pending = db.scalar(sa.select(sa.func.count()).select_from(Task).where(Task.state == "pending"))
    assert pending == 2  # only the keys another job still waits on
    claimed = claim(rt, "w", 50)
    assert sorted(t.prompt_token_ids[-1] for t in claimed) == [0, 1]
    assert claim(rt, "w", 50) == []
    again = api.post("/v1/jobs", json=body([5])).json()  # a new submission waits on an idle task again
    assert [t.prompt_token_ids for t in claim(rt, "w", 50)] == [[1, 2, 5]]
    assert again["counts"]["pending"] == 1
    assert_counters_agree(rt, [cancelled["id"], shared["id"], again["id"]])


def test_a_cancelled_job_no_longer_counts_toward_the_tenants_pending_limit(limited):
    client = limited(max_pending_requests_per_tenant=5)
    first = client.post("/v1/jobs", json=body(range(5))).json()
    assert client.post("/v1/jobs", json=body([9])).status_code == 429
    client.post(f"/v1/jobs/{first['id']}/cancel")
    assert client.post("/v1/jobs", json=body(range(10, 15))).status_code == 201


def test_the_claim_walks_an_index_of_pending_tasks_only(api, rt):
    api.post("/v1/jobs", json=body(range(5)))
    with transaction(rt.sessions) as db:
        db.execute(sa.text("SET LOCAL enable_seqscan = off"))  # small tables: ask for the index path
        plan = "\n".join(db.execute(sa.text(f"EXPLAIN {CLAIM_SQL.text}"),
                                    {"teacher": TEACHER, "owner": "x", "limit": 8, "lease_s": 1.0,
                                     "interactive_limit": 6, "batch_limit": 8}).scalars())
    assert "Seq Scan" not in plan and "requests" not in plan, plan
    # Both lanes walk their own partial index, in claim order (no sort of the backlog).
    assert "ix_tasks_claim_interactive" in plan and "ix_tasks_claim " in plan and "Sort" not in plan, plan


# -- 1: counters ---------------------------------------------------------------------------
def test_counters_equal_a_recount_after_a_mixed_run(api, rt, start_worker):
    computed = api.post("/v1/jobs", json=body([0, 1, 2, 2])).json()  # a duplicate: computed once
    start_worker(ScriptedEngine(fail_tokens=frozenset({FAIL})))
    computed = wait_for(api, computed["id"])
    mixed = api.post("/v1/jobs", json=body([0, 1, 3, 3, FAIL])).json()  # 2 cached, 2 computed, 1 fails
    refreshed = api.post("/v1/jobs", json=body([1, 2], cache="refresh")).json()
    mixed, refreshed = wait_for(api, mixed["id"]), wait_for(api, refreshed["id"])
    assert mixed["counts"] == {"total": 5, "completed": 2, "cached": 2, "failed": 1, "pending": 0, "cancelled": 0}
    assert refreshed["counts"]["completed"] == 2 and computed["counts"]["completed"] == 4
    bypass = wait_for(api, api.post("/v1/jobs", json=body([7], cache="bypass")).json()["id"])
    jobs = [computed["id"], mixed["id"], refreshed["id"], bypass["id"]]
    assert_counters_agree(rt, jobs)


def test_counters_equal_a_recount_with_a_cancel_while_running(api, rt, start_worker):
    slow = api.post("/v1/jobs", json=body(range(200))).json()  # far from done when it is cancelled
    start_worker(ScriptedEngine(step_delay_s=0.05, tokens_per_step=1), max_inflight=4)
    deadline = time.monotonic() + 30
    while api.get(f"/v1/jobs/{slow['id']}").json()["counts"]["completed"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    api.post(f"/v1/jobs/{slow['id']}/cancel")
    other = api.post("/v1/jobs", json=body(range(190, 205))).json()  # joins some cancelled keys
    slow, other = wait_for(api, slow["id"]), wait_for(api, other["id"])
    assert slow["status"] == "cancelled" and slow["counts"]["cancelled"] > 0
    assert other["status"] == "succeeded" and other["counts"]["pending"] == 0
    assert_counters_agree(rt, [slow["id"], other["id"]])


# -- 3: reconcile --------------------------------------------------------------------------
ROWS_TOUCHED_SQL = sa.text(
    """
    SELECT relname, seq_tup_read + COALESCE(idx_tup_fetch, 0) + n_tup_upd + n_tup_ins + n_tup_del AS touched
      FROM pg_stat_xact_user_tables WHERE relname IN ('requests', 'tasks', 'jobs', 'results')
    """
)


def test_reconcile_touches_no_rows_when_nothing_changed(api, rt, start_worker):
    done = api.post("/v1/jobs", json=body(range(50))).json()
    start_worker(ScriptedEngine())
    wait_for(api, done["id"])
    api.post("/v1/jobs", json=body(range(100, 400)))  # 300 pending requests nobody is working on
    with transaction(rt.sessions) as db:
        # This backend's counts not yet flushed to the shared statistics: the difference is the pass.
        before = dict(db.execute(ROWS_TOUCHED_SQL).all())
        assert reconcile_in(db) == 0
        after = dict(db.execute(ROWS_TOUCHED_SQL).all())
    touched = {table: after.get(table, 0) - before.get(table, 0) for table in after}
    assert sum(touched.values()) == 0, touched


# -- 5: fairness ---------------------------------------------------------------------------
def test_claims_take_turns_between_a_huge_job_and_a_small_one_submitted_after_it(api, other_api, rt):
    huge = api.post("/v1/jobs", json=body(range(300))).json()
    assert len(claim(rt, "w", 20)) == 20  # the huge job is under way
    small = other_api.post("/v1/jobs", json=body(range(1000, 1010))).json()
    claimed = claim(rt, "w", 20)
    with rt.sessions() as db:
        owner = dict(db.execute(sa.select(Request.cache_key, Request.job_id)
                                .where(Request.cache_key.in_([t.key for t in claimed]))).all())
    jobs = [owner[t.key] for t in claimed]
    assert jobs.count(small["id"]) == 10 and jobs.count(huge["id"]) == 10  # one turn each


def test_a_small_job_finishes_while_a_huge_one_submitted_before_it_still_runs(api, other_api, rt, start_worker):
    huge = api.post("/v1/jobs", json=body(range(600))).json()
    start_worker(ScriptedEngine(step_delay_s=0.005, tokens_per_step=1), max_inflight=8)
    deadline = time.monotonic() + 30
    while api.get(f"/v1/jobs/{huge['id']}").json()["counts"]["completed"] < 16:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    small = wait_for(other_api, other_api.post("/v1/jobs", json=body(range(1000, 1008))).json()["id"], timeout=60)
    assert small["status"] == "succeeded"
    assert api.get(f"/v1/jobs/{huge['id']}").json()["counts"]["pending"] > 300  # it had not waited for the backlog


# -- 2: metrics and the workers table --------------------------------------------------------
def test_gone_workers_are_pruned_in_bounded_passes_and_the_engine_counters_keep_what_they_ran(rt):
    """No app here: its finalizer would sweep too, and the passes are counted."""
    from service.models import Worker
    from service.results.retention import prune_workers
    from service.status.metrics import render_metrics

    def engine_requests() -> str:
        with rt.sessions() as db:
            return [line for line in render_metrics(db).decode().splitlines()
                    if line.startswith("teachercache_engine_requests_total ")][0]

    with transaction(rt.sessions) as db:
        for i in range(5):
            db.add(Worker(id=f"gone-{i}", teacher=TEACHER, hostname="h", pid=i, stats={"requests": 10, "x": i},
                          heartbeat_at=sa.func.now() - sa.text("interval '2 hours'")))
        db.add(Worker(id="alive", teacher=TEACHER, hostname="h", pid=9, stats={"requests": 1}))
    assert engine_requests() == "teachercache_engine_requests_total 51.0"
    bounded = type(rt)(rt.settings.model_copy(update={"retention_batch": 3}), rt.database_url)
    assert prune_workers(bounded) == 3 and prune_workers(bounded) == 2 and prune_workers(bounded) == 0
    with rt.sessions() as db:
        assert list(db.scalars(sa.select(Worker.id))) == ["alive"]
    assert engine_requests() == "teachercache_engine_requests_total 51.0"  # never goes down


def test_metrics_and_cache_stats_read_no_request_rows(api, rt, start_worker):
    done = api.post("/v1/jobs", json=body(range(30))).json()
    worker = start_worker(ScriptedEngine())
    wait_for(api, done["id"])
    worker.stop()  # the last job's 40 requests must stay pending while metrics are read
    api.post("/v1/jobs", json=body(range(20)))  # all hits
    api.post("/v1/jobs", json=body(range(100, 140)))  # pending
    from service.results.repository import ResultRepository
    from service.status.metrics import render_metrics

    with transaction(rt.sessions) as db:
        before = dict(db.execute(ROWS_TOUCHED_SQL).all())
        text = render_metrics(db).decode()
        stats = ResultRepository(db).cache_stats("alpha")
        after = dict(db.execute(ROWS_TOUCHED_SQL).all())
    assert after.get("requests", 0) - before.get("requests", 0) == 0
    assert 'teachercache_requests{state="pending"} 40.0' in text and 'teachercache_tasks{state="pending"} 40.0' in text
    assert f'teachercache_pending_requests{{teacher="{TEACHER}"}} 40.0' in text
    assert 'teachercache_requests_ended_total{outcome="completed"} 30.0' in text
    assert 'teachercache_requests_ended_total{outcome="cached"} 20.0' in text
    [lag] = [float(line.split()[1]) for line in text.splitlines() if line.startswith("teachercache_finalizer_lag_seconds ")]
    assert 0 <= lag < 60
    assert stats["hits"] == 20 and stats["misses"] == 70 and stats["entries"] == 30


def test_ended_jobs_counts_live_in_job_totals_and_outlive_the_jobs(api, rt, start_worker):
    """What /metrics sums for ended jobs comes from job_totals (kept by a trigger as jobs end), and
    agrees with a recount of the jobs; deleting an ended job takes nothing back."""
    from service.models import JobTotals

    def totals() -> dict:
        with rt.sessions() as db:
            rows = db.scalars(sa.select(JobTotals)).all()
            return {r.status: (r.jobs, r.n_completed, r.n_cached, r.n_failed, r.n_cancelled,
                               r.sent_prompt_tokens, r.sent_completion_tokens, r.cached_prompt_tokens,
                               r.cached_completion_tokens) for r in rows}

    def recounted() -> dict:
        with rt.sessions() as db:
            rows = db.execute(sa.select(Job.status, sa.func.count(), *[sa.func.sum(getattr(Job, c)) for c in (
                "n_completed", "n_cached", "n_failed", "n_cancelled", "sent_prompt_tokens", "sent_completion_tokens",
                "cached_prompt_tokens", "cached_completion_tokens")]).where(
                Job.status.in_(["succeeded", "failed", "cancelled"])).group_by(Job.status)).all()
            return {status: tuple(int(v) for v in values) for status, *values in rows}

    worker = start_worker(ScriptedEngine())
    computed = wait_for(api, api.post("/v1/jobs", json=body(range(12))).json()["id"])
    cached = wait_for(api, api.post("/v1/jobs", json=body(range(4))).json()["id"])
    worker.stop()
    cancelled = api.post("/v1/jobs", json=body(range(50, 56))).json()
    api.post(f"/v1/jobs/{cancelled['id']}/cancel")
    assert wait_for(api, cancelled["id"])["status"] == "cancelled"
    assert totals() == recounted()
    assert totals()["succeeded"][:3] == (2, 12, 4) and totals()["cancelled"][0] == 1
    before = totals()
    assert api.delete(f"/v1/jobs/{computed['id']}").status_code in (200, 204)
    assert api.delete(f"/v1/jobs/{cached['id']}").status_code in (200, 204)
    assert totals() == before  # the counters never go down
    from service.status.metrics import render_metrics

    with rt.sessions() as db:
        text = render_metrics(db).decode()
    assert 'teachercache_requests_ended_total{outcome="completed"} 12.0' in text
    assert 'teachercache_jobs{state="succeeded"} 2.0' in text and 'teachercache_jobs{state="cancelled"} 1.0' in text


# -- 6: the hot statements have index paths ------------------------------------------------------
def hot_statements():
    import service.jobs.repository as jobs
    import service.queue.repository as queue
    import service.queue.workers as workers
    import service.results.repository as results

    keys = {"keys": ["k2-a", "k2-b"]}
    claim_params = {"teacher": TEACHER, "owner": "x", "limit": 8, "lease_s": 1.0, "interactive_limit": 6,
                    "batch_limit": 8}
    return [
        ("claim", queue.CLAIM_SQL, claim_params, "ix_tasks_claim "),
        ("claim: the interactive lane", queue.CLAIM_SQL, claim_params, "ix_tasks_claim_interactive"),
        ("claim a suspect", queue.CLAIM_SUSPECT_SQL, claim_params, "ix_tasks_suspect"),
        ("requeue lost leases", queue.REQUEUE_LOST_SQL, {"teacher": TEACHER, "limit": 10}, "ix_tasks_lease_expiry"),
        # Either of its partial indexes (leased; suspects) is a bounded path: the planner picks.
        ("reconcile: expired suspects", queue.EXPIRE_EXHAUSTED_SQL, {}, "Index Scan using ix_tasks_"),
        ("resolve", results.RESOLVE_SQL, keys, "ix_requests_pending_key"),
        ("cancel", jobs.CANCEL_SQL, {"job_id": "job_x"}, "Index Scan using ix_requests_"),
        ("tenant pending", jobs.TENANT_PENDING_SQL, {"tenant": "alpha"}, "ix_jobs_tenant_active"),
        ("metrics: pending tasks", jobs.PENDING_TASKS_SQL, {"cap": 10}, "ix_tasks_claim"),
        # The jobs' sums read unfinished jobs only (the ended ones' are in job_totals).
        ("metrics: jobs by status", jobs.JOB_STATES_SQL, {}, "ix_jobs_status"),
        ("metrics: requests by state", jobs.REQUEST_STATES_SQL, {}, "ix_jobs_status"),
        ("metrics: pending per teacher", jobs.TEACHER_PENDING_SQL, {}, "ix_jobs_status"),
        ("metrics: spend per teacher", jobs.TEACHER_SPEND_SQL, {}, "ix_jobs_status"),
        ("metrics: leased tasks", jobs.LEASED_TASKS_SQL, {}, "ix_tasks_lease_expiry"),
        ("prune workers", workers.PRUNE_WORKERS_SQL, {"gone_s": 60, "limit": 10}, "ix_workers_heartbeat_at"),
    ]


@pytest.mark.parametrize("name, statement, params, index", hot_statements(), ids=[s[0] for s in hot_statements()])
def test_the_hot_statements_are_index_scans(rt, name, statement, params, index):
    """Never a whole-table scan: each has an index path (the planner is told to avoid sequential
    scans, as it would on tables of 10^7 rows; these are empty). Plans at 10^7: docs/query-plans.md."""
    with rt.sessions() as db, db.begin():
        db.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(db.execute(sa.text(f"EXPLAIN {statement.text}"), params).scalars())
    assert set(re.findall(r"Seq Scan on (\w+)", plan)) <= TABLES_OF_A_ROW_PER_TEACHER and index in plan, plan


# Tables whose size is teachers x modes x final states, never jobs or requests: a scan is fine.
TABLES_OF_A_ROW_PER_TEACHER = {"job_totals"}


def test_a_submission_that_joins_a_task_finished_meanwhile_answers_its_requests_itself(api, rt, start_worker,
                                                                                        monkeypatch):
    """The race reconcile used to repair: the task finished while the submission was being written
    (its result was not committed when the submission looked for hits). The submission sees the
    task `done` when it joins it and answers its own requests, with no reconcile pass."""
    from service.results.repository import ResultRepository

    first = api.post("/v1/jobs", json=body(range(3))).json()
    worker = start_worker(ScriptedEngine())
    wait_for(api, first["id"])
    worker.stop()
    monkeypatch.setattr(ResultRepository, "results_for", lambda self, keys: {})  # "not committed yet"
    late = api.post("/v1/jobs", json=body(range(3))).json()
    assert late["counts"]["pending"] == 0 and late["counts"]["completed"] == 3
    assert late["status"] in ("finalizing", "succeeded")
    assert_counters_agree(rt, [first["id"], late["id"]])


# -- the cache's two per-request lookups on a filled table -------------------------------------

FILLED_RESULTS = 200_000


def filled_results_job(rt) -> str:
    """A finalizing 4,096-request job answered from a results table of FILLED_RESULTS entries
    (seeded without an engine), with fresh statistics: the sizes at which the planner preferred
    a hash join over a sequential scan of every result to looking each request's entry up."""
    from bench.bench_assembly import seed_job

    job_id = seed_job(rt, 4096, distinct=64)
    with rt.sessions() as db, db.begin():
        shard_id = db.scalar(sa.text("SELECT shard_id FROM results LIMIT 1"))
        db.execute(sa.text(
            "INSERT INTO results (cache_key, teacher, shard_id, row_start, row_count, prompt_tokens, completion_tokens) "
            "SELECT 'filler-' || i, :teacher, :shard_id, 0, 1, 16, 64 FROM generate_series(1, :n) i"),
            {"teacher": TEACHER, "shard_id": shard_id, "n": FILLED_RESULTS})
    with rt.engine.connect() as connection:
        connection.execute(sa.text("ANALYZE results"))
        connection.execute(sa.text("ANALYZE requests"))
        connection.commit()
    return job_id


def analyzed_plan(rt, run) -> str:
    """EXPLAIN ANALYZE of the one statement `run(session)` sends, rolled back."""
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, params, context, executemany):
        statements.append((statement, params))

    sa.event.listen(rt.engine, "before_cursor_execute", capture)
    try:
        with rt.sessions() as db, db.begin():
            run(db)
            statement, params = statements[-1]
            db.rollback()
    finally:
        sa.event.remove(rt.engine, "before_cursor_execute", capture)
    with rt.engine.connect() as connection:
        cursor = connection.connection.driver_connection.cursor()
        cursor.execute("EXPLAIN (ANALYZE, COSTS OFF) " + statement, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        connection.rollback()
    return plan


def test_an_assembly_window_looks_each_request_entry_up_by_key_on_a_filled_table(rt):
    from service.results.repository import ResultRepository

    job_id = filled_results_job(rt)
    plan = analyzed_plan(rt, lambda db: ResultRepository(db).assembly_rows(job_id, 1023, 1024))
    assert "Seq Scan on results" not in plan and "Index Cond: ((cache_key)::text = (requests.result_key)::text)" in plan, plan
    assert re.search(r"Index (Only )?Scan using uq_requests_job_id_request_index|Bitmap Index Scan on uq_requests_job_id", plan), plan


def test_a_hit_lookup_reads_only_the_entries_it_looks_up_on_a_filled_table(rt):
    from service.results.repository import ResultRepository

    filled_results_job(rt)
    keys = [f"filler-{i}" for i in range(1, 2001)]
    plan = analyzed_plan(rt, lambda db: ResultRepository(db).results_for(keys))
    assert "Seq Scan on results" not in plan, plan
    assert re.search(r"Hash (Right |Left )?Join", plan) is None, plan
