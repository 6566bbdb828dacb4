"""Every SQL statement of the results domain that is not the submission path: the rows a job's
assembly reads (a window at a time), the result shards it depends on, and the repair of cache
entries whose shard is missing or damaged. Callers own the transaction; nothing here commits.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import orm

from service.models import Request, Result, Shard

# The result shards a job's answered requests read from: verified before any row is copied.
JOB_RESULT_SHARDS_SQL = sa.text(
    """
    SELECT DISTINCT s.id, s.path, s.bytes, s.sha256
      FROM requests r
      JOIN results res ON res.cache_key = r.result_key
      JOIN shards s ON s.id = res.shard_id
     WHERE r.job_id = :job_id AND r.state = 'done'
    """
)
# The cache is a cache: entries whose shard is gone or damaged are dropped with the shard row...
DROP_RESULTS_SQL = sa.text("DELETE FROM results WHERE shard_id = ANY(CAST(:shard_ids AS text[])) RETURNING cache_key")
DROP_RESULT_SHARDS_SQL = sa.text("DELETE FROM shards WHERE id = ANY(CAST(:shard_ids AS text[])) AND kind = 'result'")
# ...the requests of unfinished jobs that were answered by them go back to the queue...
REQUEUE_REQUESTS_SQL = sa.text(
    """
    UPDATE requests r SET state = 'pending', result_key = NULL, cached = false
      FROM jobs j
     WHERE j.id = r.job_id AND j.status IN ('queued', 'running', 'finalizing')
       AND r.state = 'done' AND r.result_key = ANY(CAST(:keys AS text[]))
    RETURNING r.job_id
    """
)
# ...their tasks are run again from scratch (a fresh attempt budget: the failure was storage's)...
REQUEUE_TASKS_SQL = sa.text(
    """
    UPDATE tasks SET state = 'pending', attempts = 0, errors = '[]'::jsonb, finished_at = NULL,
           lease_owner = NULL, lease_expires_at = NULL
     WHERE key = ANY(CAST(:keys AS text[])) AND state IN ('done', 'failed')
    """
)
# ...and their jobs wait for them again (they move on to finalizing when those resolve).
BACK_TO_RUNNING_SQL = sa.text(
    "UPDATE jobs SET status = 'running' WHERE id = ANY(CAST(:job_ids AS text[])) AND status = 'finalizing'"
)


@dataclass(frozen=True)
class SourceShard:
    id: str
    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class AssemblyRow:
    """One request of a job as assembly sees it; `shard_path` is None for an unanswered one."""

    request_index: int
    custom_id: str
    state: str
    cached: bool
    cache_key: str
    error: str | None
    shard_path: str | None
    row_start: int | None
    row_count: int | None


class ResultRepository:
    def __init__(self, session: orm.Session) -> None:
        self.session = session

    def job_result_shards(self, job_id: str) -> list[SourceShard]:
        return [SourceShard(*row) for row in self.session.execute(JOB_RESULT_SHARDS_SQL, {"job_id": job_id})]

    def assembly_rows(self, job_id: str, after_index: int, limit: int) -> list[AssemblyRow]:
        """The next `limit` requests after `after_index`, in request order (keyset: each window
        is one index range scan, however far into a 10^7-request job)."""
        query = (
            sa.select(Request.request_index, Request.custom_id, Request.state, Request.cached, Request.cache_key,
                      Request.error, Shard.path, Result.row_start, Result.row_count)
            .outerjoin(Result, Result.cache_key == Request.result_key)
            .outerjoin(Shard, Shard.id == Result.shard_id)
            .where(Request.job_id == job_id, Request.request_index > after_index)
            .order_by(Request.request_index)
            .limit(limit)
        )
        return [AssemblyRow(*row) for row in self.session.execute(query)]

    def drop_damaged_shards(self, shard_ids: list[str]) -> set[str]:
        """Drop the cache entries of these result shards and requeue what they answered; the jobs
        sent back to wait for their requests."""
        keys = list(self.session.scalars(DROP_RESULTS_SQL, {"shard_ids": shard_ids}))
        self.session.execute(DROP_RESULT_SHARDS_SQL, {"shard_ids": shard_ids})
        if not keys:
            return set()
        job_ids = set(self.session.scalars(REQUEUE_REQUESTS_SQL, {"keys": keys}))
        self.session.execute(REQUEUE_TASKS_SQL, {"keys": keys})
        self.session.execute(BACK_TO_RUNNING_SQL, {"job_ids": sorted(job_ids)})
        return job_ids
