"""Every SQL statement about jobs, their requests, results (the cache index) and shards.

Callers own the transaction; nothing here commits.
"""

from __future__ import annotations

import builtins
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import ARRAY, insert

from service.jobs.spend import SpendTokens
from service.models import Job, Request, Result, Shard, Task, Worker
from service.states import JOB_ACTIVE, RequestState, sql_list

# Requests waiting on a task that has a result now (e.g. it finished while they were being
# submitted) are answered from it; those waiting on a task that failed for good fail with it.
# Only once their task is done: while it is queued, running or failed, the result there is the
# entry a cache refresh is replacing, and a refreshing request must get the new rows.
RESOLVE_FROM_RESULTS_SQL = sa.text(
    """
    UPDATE requests r SET state = 'done', result_key = r.cache_key
      FROM results res
     WHERE r.state = 'pending' AND res.cache_key = r.cache_key
       AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.key = r.cache_key AND t.state <> 'done')
       AND (CAST(:keys AS text[]) IS NULL OR r.cache_key = ANY(CAST(:keys AS text[])))
    RETURNING r.job_id
    """
)
FAIL_FROM_TASKS_SQL = sa.text(
    """
    UPDATE requests r SET state = 'failed', error = t.errors::text
      FROM tasks t
     WHERE r.state = 'pending' AND t.key = r.cache_key AND t.state = 'failed'
       AND (CAST(:keys AS text[]) IS NULL OR r.cache_key = ANY(CAST(:keys AS text[])))
    RETURNING r.job_id
    """
)
# The cache as users see it. Bypass jobs index their rows under private keys that no lookup
# can find, so those are not entries. A hit is a request answered from the cache at
# submission; a miss is a request of a job that looked (cache "use") and was not.
CACHE_ENTRIES_SQL = sa.text("SELECT count(*) FROM results WHERE cache_key NOT LIKE 'bypass-%'")
CACHE_LOOKUPS_SQL = sa.text(
    """
    SELECT count(*) FILTER (WHERE r.cached) AS hits,
           count(*) FILTER (WHERE NOT r.cached AND j.cache_policy = 'use') AS misses,
           COALESCE(sum(res.prompt_tokens) FILTER (WHERE r.cached), 0) AS prompt_tokens_saved,
           COALESCE(sum(res.completion_tokens) FILTER (WHERE r.cached), 0) AS completion_tokens_saved
      FROM requests r
      JOIN jobs j ON j.id = r.job_id
      LEFT JOIN results res ON res.cache_key = r.result_key
     WHERE CAST(:tenant AS text) IS NULL OR j.tenant = :tenant
    """
)
# Spend: what a job's answered requests cost the teacher, from the results they point at. Each
# distinct result counts once per job (duplicates within a job are one computation), as sent
# when it was computed after submission, as cached when it was answered from the cache then.
JOB_SPEND_SQL = sa.text(
    """
    SELECT a.cached, COALESCE(sum(res.prompt_tokens), 0) AS prompt_tokens,
           COALESCE(sum(res.completion_tokens), 0) AS completion_tokens
      FROM (SELECT DISTINCT result_key, cached FROM requests
             WHERE job_id = :job_id AND state = 'done' AND result_key IS NOT NULL) a
      JOIN results res ON res.cache_key = a.result_key
     GROUP BY a.cached
    """
)
TEACHER_SPEND_SQL = sa.text(
    """
    SELECT j.teacher, j.mode, a.cached, COALESCE(sum(res.prompt_tokens), 0) AS prompt_tokens,
           COALESCE(sum(res.completion_tokens), 0) AS completion_tokens
      FROM (SELECT DISTINCT job_id, result_key, cached FROM requests
             WHERE state = 'done' AND result_key IS NOT NULL) a
      JOIN jobs j ON j.id = a.job_id
      JOIN results res ON res.cache_key = a.result_key
     GROUP BY j.teacher, j.mode, a.cached
    """
)
# A hit records its use, at most once a LAST_USED_RESOLUTION_S per entry (a hot entry is not
# rewritten by every submission), and skips an entry another transaction is touching right now
# (touching is best effort; waiting could deadlock two submissions that hit the same keys).
LAST_USED_RESOLUTION_S = 60
USE_RESULTS_SQL = sa.text(
    """
    WITH hit AS (
        SELECT cache_key, last_used_at FROM results WHERE cache_key = ANY(CAST(:keys AS text[])) FOR KEY SHARE
    ), stale AS (
        SELECT res.cache_key FROM results res JOIN hit ON hit.cache_key = res.cache_key
         WHERE hit.last_used_at < now() - make_interval(secs => :resolution_s)
           FOR NO KEY UPDATE OF res SKIP LOCKED
    ), touched AS (
        UPDATE results res SET last_used_at = now() FROM stale WHERE res.cache_key = stale.cache_key
    )
    SELECT cache_key FROM hit
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
# Jobs with nothing pending move on to finalizing (their output shards get assembled).
READY_TO_FINALIZE_SQL = sa.text(
    f"""
    UPDATE jobs j SET status = 'finalizing', started_at = COALESCE(j.started_at, now())
     WHERE j.id = ANY(CAST(:job_ids AS text[])) AND j.status IN ({sql_list(JOB_ACTIVE)})
       AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.id AND r.state = 'pending')
    """
)
MARK_RUNNING_SQL = sa.text(
    """
    UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, now())
     WHERE id = ANY(CAST(:job_ids AS text[])) AND status = 'queued'
    """
)
# A job another finalizer holds is skipped, and so is one backing off after a failed assembly.
CLAIM_FINALIZING_SQL = sa.text(
    """
    SELECT id FROM jobs WHERE status = 'finalizing'
       AND (finalize_not_before IS NULL OR finalize_not_before <= now())
     ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED
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


def any_key(keys: list[str]) -> sa.ColumnElement:
    """`= ANY(:keys)`: one array parameter however many keys (IN takes one per key, at most 65,535)."""
    return sa.any_(sa.bindparam("keys", keys, type_=ARRAY(sa.String)))


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
        with self.session.connection().connection.cursor() as cursor:
            with cursor.copy(COPY_REQUESTS_SQL.format(columns=", ".join(columns))) as copy:
                for row in rows:
                    copy.write_row([row[column] for column in columns])

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
        query = (
            sa.select(sa.func.count())
            .select_from(Request)
            .join(Job, Job.id == Request.job_id)
            .where(Job.tenant == tenant, Job.status.in_(JOB_ACTIVE), Request.state == RequestState.PENDING)
        )
        return int(self.session.scalar(query))

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

    def counts(self, job_id: str) -> dict[str, int]:
        query = (
            sa.select(Request.state, Request.cached, sa.func.count())
            .where(Request.job_id == job_id)
            .group_by(Request.state, Request.cached)
        )
        counts = {"completed": 0, "cached": 0, "failed": 0, "pending": 0, "cancelled": 0}
        for state, cached, n in self.session.execute(query):
            bucket = "cached" if state == "done" and cached else {"done": "completed"}.get(state, state)
            counts[bucket] += n
        counts["total"] = sum(counts.values())
        return counts

    def results_for(self, keys: builtins.list[str]) -> set[str]:
        """The keys with a cache entry, each now recorded as used (least-recently-used eviction)
        and held (FOR KEY SHARE) until this transaction ends, so no eviction removes an entry a
        submission is answering requests from."""
        if not keys:
            return set()
        return set(self.session.scalars(USE_RESULTS_SQL, {"keys": keys, "resolution_s": LAST_USED_RESOLUTION_S}))

    def expired_jobs(self, retention_s: float, limit: int) -> builtins.list[tuple[str, str]]:
        """(id, tenant) of up to `limit` jobs that ended more than `retention_s` ago, oldest first,
        locked (another sweeper skips them)."""
        rows = self.session.execute(EXPIRED_JOBS_SQL, {"retention_s": retention_s, "limit": limit})
        return [(job_id, tenant) for job_id, tenant in rows]

    def add_results(self, rows: builtins.list[dict[str, Any]]) -> None:
        """Index computed rows; a recomputation (cache refresh) replaces the entry."""
        if not rows:
            return
        statement = insert(Result)
        columns = ("shard_id", "row_start", "row_count", "prompt_tokens", "completion_tokens")
        statement = statement.on_conflict_do_update(
            index_elements=[Result.cache_key],
            set_={c: statement.excluded[c] for c in columns} | {"created_at": sa.func.now()},
        )
        self.session.execute(statement, rows)  # executemany: batched under the bind-parameter limit

    def add_shard(self, shard: Shard) -> None:
        self.session.add(shard)
        self.session.flush()

    def resolve_requests(self, keys: builtins.list[str] | None) -> set[str]:
        """Answer pending requests from results / failed tasks; return the jobs touched."""
        params = {"keys": keys}
        done = self.session.execute(RESOLVE_FROM_RESULTS_SQL, params).scalars().all()
        failed = self.session.execute(FAIL_FROM_TASKS_SQL, params).scalars().all()
        return set(done) | set(failed)

    def advance_jobs(self, job_ids: set[str]) -> None:
        if job_ids:
            ids = sorted(job_ids)
            self.session.execute(MARK_RUNNING_SQL, {"job_ids": ids})
            self.session.execute(READY_TO_FINALIZE_SQL, {"job_ids": ids})

    def active_jobs(self) -> set[str]:
        return set(self.session.scalars(sa.select(Job.id).where(Job.status.in_(JOB_ACTIVE))))

    def claim_job_to_finalize(self) -> Job | None:
        job_id = self.session.execute(CLAIM_FINALIZING_SQL).scalar_one_or_none()
        return self.session.get(Job, job_id) if job_id else None

    def record_finalize_failure(self, job_id: str, reason: str, max_attempts: int, backoff_s: float) -> str:
        """Count a failed assembly on the job; its status after (`failed` once out of attempts)."""
        params = {"job_id": job_id, "reason": reason[:2000], "max_attempts": max_attempts, "backoff_s": backoff_s}
        return self.session.execute(FINALIZE_FAILED_SQL, params).scalar_one()

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
        return self.session.execute(DELETE_REQUESTS_CHUNK_SQL, {"job_id": job_id, "rows": rows}).rowcount

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

    def cancel_pending(self, job_id: str) -> None:
        self.session.execute(
            sa.update(Request)
            .where(Request.job_id == job_id, Request.state == RequestState.PENDING)
            .values(state=RequestState.CANCELLED, error="cancelled")
        )

    def prompts_for(self, keys: builtins.list[str]) -> dict[str, list[int]]:
        rows = self.session.execute(sa.select(Task.key, Task.prompt_token_ids).where(Task.key == any_key(keys)))
        return dict(rows.all())

    def cache_stats(self, tenant: str | None = None) -> dict[str, int]:
        """Entries of the shared cache; hits and misses of one tenant's requests (all when None)."""
        entries = self.session.execute(CACHE_ENTRIES_SQL).scalar_one()
        lookups = self.session.execute(CACHE_LOOKUPS_SQL, {"tenant": tenant}).mappings().one()
        return {"entries": entries, **{name: int(value) for name, value in lookups.items()}}

    def spend_tokens(self, job_id: str) -> SpendTokens:
        """{cached: (prompt tokens, completion tokens)} of the results that answered the job."""
        rows = self.session.execute(JOB_SPEND_SQL, {"job_id": job_id})
        return {cached: (int(prompt), int(completion)) for cached, prompt, completion in rows}

    def spend_tokens_by_teacher(self) -> builtins.list[tuple[str, str, bool, int, int]]:
        """(teacher, mode, cached, prompt tokens, completion tokens): the jobs' spend, summed."""
        return [(t, m, c, int(p), int(n)) for t, m, c, p, n in self.session.execute(TEACHER_SPEND_SQL)]

    def online_workers(self, within_s: int = 60) -> dict[str, int]:
        query = (
            sa.select(Worker.teacher, sa.func.count())
            .where(Worker.stopped_at.is_(None),
                   Worker.heartbeat_at > sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, within_s))
            .group_by(Worker.teacher)
        )
        return dict(self.session.execute(query).all())

    def engine_totals(self) -> dict[str, int]:
        """What every worker's engine has actually run, summed over workers (alive or not)."""
        totals: dict[str, int] = {}
        for stats in self.session.scalars(sa.select(Worker.stats)):
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + int(value)
        return totals

    def engine_totals_by_teacher(self) -> dict[str, dict[str, int]]:
        """The same, per teacher (a remote engine's stats also count its HTTP traffic)."""
        totals: dict[str, dict[str, int]] = {}
        for teacher, stats in self.session.execute(sa.select(Worker.teacher, Worker.stats)):
            bucket = totals.setdefault(teacher, {})
            for name, value in stats.items():
                bucket[name] = bucket.get(name, 0) + int(value)
        return totals

    def state_counts(self) -> dict[str, dict[str, int]]:
        def grouped(column):
            return dict(self.session.execute(sa.select(column, sa.func.count()).group_by(column)).all())

        return {"jobs": grouped(Job.status), "requests": grouped(Request.state), "tasks": grouped(Task.state)}
