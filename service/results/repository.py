"""Every SQL statement of the results domain that is not the submission path: the rows a job's
assembly reads (a window at a time), the result shards it depends on, and the repair of cache
entries whose shard is missing or damaged. Callers own the transaction; nothing here commits.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import orm

from service.models import Request, Result, Shard
from service.states import JOB_UNFINISHED, sql_list

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
    f"""
    UPDATE requests r SET state = 'pending', result_key = NULL, cached = false
      FROM jobs j
     WHERE j.id = r.job_id AND j.status IN ({sql_list(JOB_UNFINISHED)})
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

# Retention. How far the cache is over its entry budget, at most :limit: an index-only walk of
# the newest :max_entries entries (work proportional to the budget, never to what is beyond it).
OVER_BUDGET_SQL = sa.text(
    """
    SELECT count(*) FROM (SELECT 1 FROM results ORDER BY last_used_at DESC OFFSET :max_entries LIMIT :limit) beyond
    """
)
# The least recently used entries last used over :idle_s ago, oldest first, that nothing still
# waits on: no request of an unfinished job was answered by one (its assembly will read it) and
# no pending request waits on its key (it is about to be answered by it). Locked; another
# sweeper skips them, and so do submissions holding a hit (FOR KEY SHARE conflicts).
EVICTABLE_SQL = sa.text(
    f"""
    SELECT res.cache_key, res.shard_id FROM results res
     WHERE res.last_used_at < now() - make_interval(secs => :idle_s)
       AND NOT EXISTS (SELECT 1 FROM requests r JOIN jobs j ON j.id = r.job_id
                        WHERE r.result_key = res.cache_key AND j.status IN ({sql_list(JOB_UNFINISHED)}))
       AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.cache_key = res.cache_key AND r.state = 'pending')
     ORDER BY res.last_used_at, res.cache_key LIMIT :limit
       FOR UPDATE OF res SKIP LOCKED
    """
)
EVICT_RESULTS_SQL = sa.text("DELETE FROM results WHERE cache_key = ANY(CAST(:keys AS text[]))")
# An evicted key's finished task goes too: a later miss enqueues it afresh (enqueue leaves a
# `done` task alone, and its requests would wait for a result that never comes).
EVICT_DONE_TASKS_SQL = sa.text("DELETE FROM tasks WHERE key = ANY(CAST(:keys AS text[])) AND state = 'done'")
# A result shard goes once no entry points at it. Its row is locked first, in a statement of
# its own, so two sweepers evicting its last entries at once do not both see the other's.
LOCK_RESULT_SHARDS_SQL = sa.text(
    "SELECT id FROM shards WHERE id = ANY(CAST(:shard_ids AS text[])) AND kind = 'result' ORDER BY id FOR UPDATE"
)
DROP_UNUSED_RESULT_SHARDS_SQL = sa.text(
    """
    DELETE FROM shards s WHERE s.id = ANY(CAST(:shard_ids AS text[])) AND s.kind = 'result'
       AND NOT EXISTS (SELECT 1 FROM results res WHERE res.shard_id = s.id)
    RETURNING s.path
    """
)
# The cache's stored size: the result shards' bytes, from the few rows migration 0010's trigger keeps.
CACHE_BYTES_SQL = sa.text("SELECT coalesce(sum(bytes), 0) FROM cache_usage")
# Each of the :limit least recently used entries' share of its result shard's bytes: its rows'
# fraction of the rows still indexed in that shard, so the shares of a shard's live entries add
# up to the shard's bytes (what evicting them all reclaims). Oldest first; an index walk from the
# oldest use bounded by :limit, and per entry an index scan of its shard's entries.
LRU_SHARES_SQL = sa.text(
    """
    SELECT s.bytes::float8 * res.row_count / greatest(live.row_count, 1)
      FROM (SELECT cache_key, shard_id, row_count, last_used_at FROM results
             ORDER BY last_used_at, cache_key LIMIT :limit) res
      JOIN shards s ON s.id = res.shard_id
      CROSS JOIN LATERAL (SELECT sum(row_count) AS row_count FROM results o WHERE o.shard_id = res.shard_id) live
     ORDER BY res.last_used_at, res.cache_key
    """
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
    parameters: dict | None = None  # the request's own parameters, where they differ from the job's


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
                      Request.error, Shard.path, Result.row_start, Result.row_count, Request.parameters)
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

    def over_budget(self, max_entries: int, limit: int) -> int:
        """How many entries are beyond the newest `max_entries`, at most `limit`."""
        return int(self.session.scalar(OVER_BUDGET_SQL, {"max_entries": max_entries, "limit": limit}))

    def cache_bytes(self) -> int:
        """The stored bytes of every result shard (what the byte budget counts)."""
        return int(self.session.scalar(CACHE_BYTES_SQL))

    def entries_covering(self, over_bytes: int, limit: int) -> int:
        """How many of the least recently used entries (at most `limit`) it takes for their
        shares of their shards' bytes to add up to `over_bytes`."""
        total, count = 0.0, 0
        for (share,) in self.session.execute(LRU_SHARES_SQL, {"limit": limit}):
            if total >= over_bytes:
                break
            total += share
            count += 1
        return count

    def evict(self, idle_s: float, limit: int) -> tuple[int, list[str]]:
        """Evict up to `limit` least recently used entries unused for over `idle_s` seconds that
        no unfinished job needs; (entries evicted, storage paths of the result shards left with
        no entry, for the caller to remove once this transaction has committed)."""
        rows = self.session.execute(EVICTABLE_SQL, {"idle_s": idle_s, "limit": limit}).all()
        if not rows:
            return 0, []
        keys = [key for key, _ in rows]
        shard_ids = sorted({shard_id for _, shard_id in rows})
        self.session.execute(EVICT_RESULTS_SQL, {"keys": keys})
        self.session.execute(EVICT_DONE_TASKS_SQL, {"keys": keys})
        self.session.execute(LOCK_RESULT_SHARDS_SQL, {"shard_ids": shard_ids})
        return len(keys), list(self.session.scalars(DROP_UNUSED_RESULT_SHARDS_SQL, {"shard_ids": shard_ids}))
