"""Every SQL statement about jobs and their requests (the cache index and result shards are the
results domain's: service/results/repository.py).

Callers own the transaction; nothing here commits.
"""

from __future__ import annotations

import builtins
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import ARRAY

from service.db import copy_cursor
from service.models import Job, Request, Shard
from service.states import JOB_ACTIVE, JOB_UNFINISHED, JobStatus, RequestState, TaskState, sql_list

BUCKETS = ("pending", "completed", "cached", "failed", "cancelled")


def with_counters(moved_sql: str) -> sa.TextClause:
    """A statement that moves requests between states and, in the same statement, keeps what
    counts them: the counters and spend of their jobs and the waiters of their tasks.

    `moved_sql` defines the CTEs up to one named `moved`, a row per request moved, with
    (job_id, cache_key, from_bucket, to_bucket, prompt_tokens, completion_tokens): the buckets
    are BUCKETS, and the tokens are those of the result that answers it (or answered it). A
    job's spend counts each distinct result once (duplicates in a job are one computation),
    and a job whose pending count reaches 0 moves on to finalizing (as a cancelled one does). Job
    rows are locked in id order, so two of these statements never deadlock on each other's jobs.
    """
    def delta(value: str, bucket: str) -> str:
        return f"sum({value} * ((to_bucket = '{bucket}')::int - (from_bucket = '{bucket}')::int))"

    count_deltas = ",\n".join(f"{delta('n', b)} AS d_{b}" for b in BUCKETS)
    set_counts = ", ".join(f"n_{b} = j.n_{b} + d.d_{b}" for b in BUCKETS)
    return sa.text(
        f"""
        {moved_sql},
        per_key AS (
            SELECT job_id, cache_key, from_bucket, to_bucket, count(*) AS n,
                   max(prompt_tokens) AS p, max(completion_tokens) AS c
              FROM moved GROUP BY job_id, cache_key, from_bucket, to_bucket
        ), per_job AS (
            SELECT job_id, {count_deltas},
                   {delta('p', 'completed')} AS d_sent_p, {delta('c', 'completed')} AS d_sent_c,
                   {delta('p', 'cached')} AS d_cached_p, {delta('c', 'cached')} AS d_cached_c
              FROM per_key GROUP BY job_id
        ), locked AS (
            SELECT id FROM jobs WHERE id IN (SELECT job_id FROM per_job) ORDER BY id FOR NO KEY UPDATE
        ), counted AS (
            UPDATE jobs j SET {set_counts},
                   sent_prompt_tokens = j.sent_prompt_tokens + d.d_sent_p,
                   sent_completion_tokens = j.sent_completion_tokens + d.d_sent_c,
                   cached_prompt_tokens = j.cached_prompt_tokens + d.d_cached_p,
                   cached_completion_tokens = j.cached_completion_tokens + d.d_cached_c,
                   status = CASE
                       WHEN j.status IN ('queued', 'running') AND j.n_pending + d.d_pending = 0 THEN 'finalizing'
                       WHEN j.status = 'finalizing' AND j.n_pending + d.d_pending > 0 THEN 'running'
                       WHEN j.status = 'queued' THEN 'running'
                       ELSE j.status END,
                   ready_at = CASE
                       WHEN j.status IN ('queued', 'running') AND j.n_pending + d.d_pending = 0 THEN now()
                       ELSE j.ready_at END,
                   started_at = COALESCE(j.started_at, now())
              FROM per_job d JOIN locked l ON l.id = d.job_id
             WHERE j.id = d.job_id
            RETURNING j.id
        ), waited AS (
            UPDATE tasks t SET waiters = t.waiters + w.d,
                   state = CASE WHEN t.state = 'pending' AND t.waiters + w.d <= 0 THEN 'idle' ELSE t.state END
              FROM (SELECT cache_key, {delta('n', 'pending')} AS d FROM per_key GROUP BY cache_key) w
             WHERE t.key = w.cache_key AND w.d <> 0
        )
        SELECT id FROM counted
        """
    )


# Cancelling stops the job's pending requests; a task no other request waits on becomes idle.
CANCEL_SQL = with_counters(
    """
    WITH cancelled AS (
        UPDATE requests SET state = 'cancelled', error = 'cancelled'
         WHERE job_id = :job_id AND state = 'pending'
        RETURNING job_id, cache_key
    ), moved AS (
        SELECT job_id, cache_key, 'pending' AS from_bucket, 'cancelled' AS to_bucket, 0 AS prompt_tokens,
               0 AS completion_tokens
          FROM cancelled
    )
    """
)
# Which of a batch's cache hits an earlier batch of the same file job answered (and counted in
# its cached spend): one probe of ix_requests_result_key (result_key, job_id) per key.
HITS_ANSWERED_BEFORE_SQL = sa.text(
    """
    SELECT DISTINCT result_key FROM requests
     WHERE result_key = ANY(string_to_array(:keys, ',')) AND job_id = :job_id AND cached
    """
)
# A tenant's pending work: the counters of its unfinished jobs (ix_jobs_tenant_active).
TENANT_PENDING_SQL = sa.text(
    "SELECT COALESCE(sum(n_pending), 0) FROM jobs WHERE tenant = :tenant AND status IN ('queued', 'running')"
)
# /metrics: requests by state from the jobs' counters; tasks by bounded index-only counts.
# The scrape's sums are O(unfinished jobs), never O(jobs): unfinished jobs are summed live (by
# ix_jobs_status), and what ended jobs counted is read from job_totals, which a trigger on jobs
# keeps (migration 0017) as a job ends, so an ended job's counts outlive its row (counters that
# never go down when retention deletes jobs).
UNFINISHED = sql_list(JOB_UNFINISHED)
REQUEST_STATES_SQL = sa.text(
    f"""
    SELECT sum(pending) AS pending, sum(completed) AS completed, sum(cached) AS cached,
           sum(failed) AS failed, sum(cancelled) AS cancelled
      FROM (SELECT n_pending AS pending, n_completed AS completed, n_cached AS cached, n_failed AS failed,
                   n_cancelled AS cancelled FROM jobs WHERE status IN ({UNFINISHED})
            UNION ALL
            SELECT 0, n_completed, n_cached, n_failed, n_cancelled FROM job_totals) counted
    """
)
# Jobs by status: unfinished ones counted live; ended ones as job_totals counted them.
JOB_STATES_SQL = sa.text(
    f"""
    SELECT status, sum(n) FROM (SELECT status, count(*) AS n FROM jobs WHERE status IN ({UNFINISHED}) GROUP BY status
                                UNION ALL SELECT status, jobs FROM job_totals) counted
     GROUP BY status
    """
)
# Pending requests per teacher: every teacher with jobs gets a sample (0 once they are done).
TEACHER_PENDING_SQL = sa.text(
    f"""
    SELECT teacher, sum(n) FROM (
        SELECT teacher, COALESCE(sum(n_pending) FILTER (WHERE status IN ({sql_list(JOB_ACTIVE)})), 0) AS n
          FROM jobs WHERE status IN ({UNFINISHED}) GROUP BY teacher
        UNION ALL SELECT teacher, 0 FROM job_totals) counted
     GROUP BY teacher
    """
)
# How long the job that has waited longest for its assembly has waited (ix_jobs_status).
FINALIZER_LAG_SQL = sa.text(
    "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(ready_at)), 0) FROM jobs WHERE status = 'finalizing'"
)
COUNT_CAP = 10_000
PENDING_TASKS_SQL = sa.text(
    "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE state = 'pending' AND NOT suspect LIMIT :cap) capped"
)
LEASED_TASKS_SQL = sa.text("SELECT count(*) FROM tasks WHERE state = 'leased'")  # ix_tasks_lease_expiry: in flight only
INDEX_SIZE_SQL = sa.text("SELECT reltuples FROM pg_class WHERE relname = :index")
TEACHER_SPEND_SQL = sa.text(
    f"""
    SELECT teacher, mode, sum(sp), sum(sc), sum(cp), sum(cc) FROM (
        SELECT teacher, mode, sent_prompt_tokens AS sp, sent_completion_tokens AS sc, cached_prompt_tokens AS cp,
               cached_completion_tokens AS cc FROM jobs WHERE status IN ({UNFINISHED})
        UNION ALL
        SELECT teacher, mode, sent_prompt_tokens, sent_completion_tokens, cached_prompt_tokens,
               cached_completion_tokens FROM job_totals) spent
     GROUP BY teacher, mode
    """
)
# Retention: the oldest finished jobs past the retention time (ix_jobs_finished_at).
EXPIRED_JOBS_SQL = sa.text(
    """
    SELECT id, tenant FROM jobs
     WHERE finished_at IS NOT NULL AND finished_at < now() - make_interval(secs => :retention_s)
       AND status <> 'deleting'
     ORDER BY finished_at LIMIT :limit FOR UPDATE SKIP LOCKED
    """
)
# A job too big to delete in one transaction is marked `deleting` (invisible to its tenant, its
# idempotency key released) and its requests go a bounded chunk per transaction.
MARK_DELETING_SQL = sa.text("UPDATE jobs SET status = 'deleting', idempotency_key = NULL WHERE id = :job_id")
DELETE_JOB_SHARDS_SQL = sa.text("DELETE FROM shards WHERE job_id = :job_id AND kind = 'job'")
DELETING_JOBS_SQL = sa.text(
    "SELECT id FROM jobs WHERE status = 'deleting' ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
)
DELETE_REQUESTS_CHUNK_SQL = sa.text(
    """
    DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE job_id = :job_id LIMIT :rows)
    """
)
COPY_REQUESTS_SQL = "COPY requests ({columns}) FROM STDIN"
# The first request of a job whose custom_id an earlier request has (a file's ids are checked
# here, once, rather than held in the API's memory), with that earlier request.
FIRST_DUPLICATE_CUSTOM_ID_SQL = sa.text(
    """
    SELECT request_index, first_index FROM (
        SELECT request_index, min(request_index) OVER (PARTITION BY custom_id) AS first_index
          FROM requests WHERE job_id = :job_id) r
     WHERE request_index <> first_index
     ORDER BY request_index LIMIT 1
    """
)
# A job another finalizer holds is skipped, and so is one backing off after a failed assembly.
# FOR NO KEY UPDATE, not FOR UPDATE: finalizing changes no key of the job, and FOR UPDATE
# conflicts with the FOR KEY SHARE that any insert referencing the job (a progress snapshot, a
# shard) holds until it commits, so one worker paused inside such a transaction (SIGSTOP, a
# frozen VM) had every finalizer skip that job for as long as it stayed paused.
CLAIM_FINALIZING_SQL = sa.text(
    """
    SELECT id FROM jobs WHERE status = 'finalizing'
       AND (finalize_not_before IS NULL OR finalize_not_before <= now())
     ORDER BY created_at LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED
    """
)
# One more failed attempt: back off exponentially (capped), or end the job failed with the reason.
FINALIZE_FAILED_SQL = sa.text(
    """
    UPDATE jobs SET finalize_attempts = finalize_attempts + 1, error = :reason,
           finalize_not_before = now() + make_interval(secs => LEAST(CAST(:backoff_s AS double precision) * 2 ^ finalize_attempts, 300)),
           status = CASE WHEN finalize_attempts + 1 >= :max_attempts THEN 'failed' ELSE status END,
           finished_at = CASE WHEN finalize_attempts + 1 >= :max_attempts THEN now() END
     WHERE id = :job_id
    RETURNING status
    """
)


def bounded_count(session: orm.Session, statement: sa.TextClause, index: str) -> int:
    """An exact count up to COUNT_CAP rows; past it, the index's size as Postgres last measured
    it (VACUUM / ANALYZE), so a scrape never walks 10^7 index entries."""
    exact = int(session.scalar(statement, {"cap": COUNT_CAP}))
    if exact < COUNT_CAP:
        return exact
    return max(exact, int(session.scalar(INDEX_SIZE_SQL, {"index": index}) or 0))


def any_key(keys: list[str]) -> sa.ColumnElement[Any]:
    """`= ANY(:keys)`: one array parameter however many keys (IN takes one per key, at most 65,535)."""
    return sa.any_(sa.bindparam("keys", keys, type_=ARRAY(sa.String)))


def joined_keys(keys: list[str]) -> str:
    """Cache keys as one comma-separated text (split in SQL): a submission looks up 5,000 at a
    time, and the driver quotes a text[] parameter element by element."""
    joined = ",".join(keys)
    if joined.count(",") != len(keys) - 1:
        raise ValueError("a cache key holds a comma")  # never: keys are hex digests and ids
    return joined


class JobRepository:
    def __init__(self, session: orm.Session) -> None:
        self.session = session

    def add_job(self, job: Job) -> None:
        self.session.add(job)
        self.session.flush()

    def add_requests(self, rows: builtins.list[dict[str, Any]]) -> None:
        """COPY, in the session's transaction: a 100,000-request job is 2-3x faster than executemany."""
        if not rows:
            return
        columns = list(rows[0])  # every row has the same keys: the service's request_row()
        with copy_cursor(self.session) as cursor:
            with cursor.copy(COPY_REQUESTS_SQL.format(columns=", ".join(columns))) as copy:
                for row in rows:
                    copy.write_row([row[column] for column in columns])

    def hits_answered_before(self, job_id: str, keys: builtins.list[str]) -> set[str]:
        """Of `keys` (cache hits), those a request of the job written earlier was answered from."""
        if not keys:
            return set()
        rows = self.session.execute(HITS_ANSWERED_BEFORE_SQL, {"keys": joined_keys(keys), "job_id": job_id})
        return set(rows.scalars())

    def first_duplicate_custom_id(self, job_id: str) -> tuple[int, int] | None:
        """(request index, index of the earlier request with its custom_id), or None."""
        row = self.session.execute(FIRST_DUPLICATE_CUSTOM_ID_SQL, {"job_id": job_id}).one_or_none()
        return None if row is None else (row.request_index, row.first_index)

    def get(self, job_id: str, lock: bool = False) -> Job | None:
        return self.session.get(Job, job_id, with_for_update=lock)

    def owned(self, job_id: str, tenant: str, lock: bool = False) -> Job | None:
        """The job if it is the tenant's: another tenant's job, a missing one and one being
        deleted look the same."""
        query = sa.select(Job).where(Job.id == job_id, Job.tenant == tenant, Job.status != "deleting")
        return self.session.scalar(query.with_for_update() if lock else query)

    def lock_idempotency_key(self, tenant: str, key: str) -> bool:
        """Hold the key for this transaction; False while another submission is writing it."""
        statement = sa.text("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))")
        return bool(self.session.execute(statement, {"key": f"idempotency:{tenant}:{key}"}).scalar())

    def by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        return self.session.scalar(sa.select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))

    def lock_tenant_submissions(self, tenant: str) -> None:
        """Until this transaction ends, the tenant's other submissions wait here."""
        statement = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")
        self.session.execute(statement, {"key": f"submissions:{tenant}"})

    def pending_requests(self, tenant: str) -> int:
        """Requests of the tenant's unfinished jobs still waiting for the teacher."""
        return int(self.session.scalar(TENANT_PENDING_SQL, {"tenant": tenant}))

    def list(self, tenant: str, limit: int, before: tuple[Any, str] | None,
             status: str | None = None) -> builtins.list[Job]:
        query = (
            sa.select(Job).where(Job.tenant == tenant, Job.status != "deleting")
            .order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        )
        if status is not None:
            query = query.where(Job.status == status)
        if before is not None:
            query = query.where(sa.tuple_(Job.created_at, Job.id) < sa.tuple_(*before))
        return list(self.session.scalars(query))

    def expired_jobs(self, retention_s: float, limit: int) -> builtins.list[tuple[str, str]]:
        """(id, tenant) of up to `limit` jobs that ended more than `retention_s` ago, oldest first,
        locked (another sweeper skips them)."""
        rows = self.session.execute(EXPIRED_JOBS_SQL, {"retention_s": retention_s, "limit": limit})
        return [(job_id, tenant) for job_id, tenant in rows]

    def claim_job_to_finalize(self) -> Job | None:
        job_id = self.session.execute(CLAIM_FINALIZING_SQL).scalar_one_or_none()
        return self.session.get(Job, job_id) if job_id else None

    def record_finalize_failure(self, job_id: str, reason: str, max_attempts: int, backoff_s: float) -> str:
        """Count a failed assembly on the job; its status after (`failed` once out of attempts)."""
        params = {"job_id": job_id, "reason": reason[:2000], "max_attempts": max_attempts, "backoff_s": backoff_s}
        return str(self.session.execute(FINALIZE_FAILED_SQL, params).scalar_one())

    def delete_job(self, job_id: str) -> None:
        """The job row; its requests and job shards go with it (ON DELETE CASCADE), a batch's link
        is cleared (SET NULL)."""
        self.session.execute(sa.delete(Job).where(Job.id == job_id))

    def mark_deleting(self, job_id: str) -> None:
        """Hide the job and drop its shard index rows now; its requests go later, in chunks."""
        self.session.execute(DELETE_JOB_SHARDS_SQL, {"job_id": job_id})
        self.session.execute(MARK_DELETING_SQL, {"job_id": job_id})

    def deleting_jobs(self, limit: int) -> builtins.list[str]:
        """Up to `limit` jobs marked `deleting`, locked (another sweeper works on others)."""
        return list(self.session.scalars(DELETING_JOBS_SQL, {"limit": limit}))

    def delete_requests_chunk(self, job_id: str, rows: int) -> int:
        """Delete at most `rows` of the job's requests; how many went."""
        deleted: sa.CursorResult[Any] = self.session.execute(  # type: ignore[assignment]  # a DELETE's
            DELETE_REQUESTS_CHUNK_SQL, {"job_id": job_id, "rows": rows})
        return int(deleted.rowcount)

    def job_shards(self, job_id: str) -> builtins.list[Shard]:
        query = sa.select(Shard).where(Shard.job_id == job_id, Shard.kind == "job").order_by(Shard.shard_index)
        return list(self.session.scalars(query))

    def job_shard(self, shard_id: str, tenant: str) -> Shard | None:
        """One of the tenant's job output shards; result shards and other tenants' are never served."""
        query = (
            sa.select(Shard)
            .join(Job, Job.id == Shard.job_id)
            .where(Shard.id == shard_id, Shard.kind == "job", Job.tenant == tenant)
        )
        return self.session.scalar(query)

    def failed_requests(self, job_id: str, limit: int, after: int = -1) -> builtins.list[Request]:
        """A page of the job's failed requests after request index `after` (the (job_id,
        request_index) key keeps each page a bounded index range scan)."""
        query = (
            sa.select(Request)
            .where(Request.job_id == job_id, Request.state.in_((RequestState.FAILED, RequestState.CANCELLED)),
                   Request.request_index > after)
            .order_by(Request.request_index)
            .limit(limit)
        )
        return list(self.session.scalars(query))

    def cancel(self, job_id: str) -> None:
        """Cancel the job's pending requests (their tasks idle when nobody else waits on them)
        and send the job to finalizing, to be assembled with what was done."""
        self.session.execute(CANCEL_SQL, {"job_id": job_id})
        self.session.execute(sa.update(Job).where(Job.id == job_id)
                             .values(status=JobStatus.FINALIZING, cancel_requested_at=sa.func.now(),
                                     ready_at=sa.func.coalesce(Job.ready_at, sa.func.now())))

    def spend_tokens_by_teacher(self) -> builtins.list[tuple[str, str, bool, int, int]]:
        """(teacher, mode, cached, prompt tokens, completion tokens): the jobs' spend, summed."""
        rows = []
        for teacher, mode, sent_p, sent_c, cached_p, cached_c in self.session.execute(TEACHER_SPEND_SQL):
            rows += [(teacher, mode, False, int(sent_p), int(sent_c)), (teacher, mode, True, int(cached_p), int(cached_c))]
        return rows

    def requests_by_state(self) -> dict[str, int]:
        """Requests pending, completed, cached, failed, cancelled: the jobs' counters, summed."""
        return {state: int(n or 0) for state, n in self.session.execute(REQUEST_STATES_SQL).mappings().one().items()}

    def pending_by_teacher(self) -> dict[str, int]:
        return {teacher: int(n) for teacher, n in self.session.execute(TEACHER_PENDING_SQL)}

    def finalizer_lag_s(self) -> float:
        """Seconds the longest-waiting job ready for assembly has waited (0: none waits)."""
        return float(self.session.scalar(FINALIZER_LAG_SQL))

    def state_counts(self) -> dict[str, dict[str, int]]:
        """Jobs by status and requests by state, from the unfinished jobs' counters and the ended
        jobs' totals (never a row per request, nor per ended job); tasks pending and leased, by
        bounded index-only counts."""
        jobs = {status: int(n) for status, n in self.session.execute(JOB_STATES_SQL)}
        ended = self.requests_by_state()
        requests: dict[str, int] = {
            RequestState.PENDING: ended.pop("pending"), RequestState.DONE: ended["completed"] + ended["cached"],
            RequestState.FAILED: ended["failed"], RequestState.CANCELLED: ended["cancelled"]}
        tasks: dict[str, int] = {
            TaskState.PENDING: bounded_count(self.session, PENDING_TASKS_SQL, "ix_tasks_claim"),
            TaskState.LEASED: int(self.session.scalar(LEASED_TASKS_SQL))}
        return {"jobs": jobs, "requests": requests, "tasks": tasks}
