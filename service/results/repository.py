"""Every SQL statement of the results domain: the cache index (hits, entries, stats), result
and job shard rows, answering the requests waiting on finished tasks, the rows a job's assembly
reads (a window at a time), the result shards it depends on, the repair of cache entries whose
shard is missing or damaged, and retention's eviction. Callers own the transaction; nothing
here commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import insert

from service.jobs.repository import any_key, bounded_count, joined_keys, with_counters
from service.models import Request, Result, Shard, Task
from service.notify import ANY, TASKS_QUEUED, announce
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
# Requests waiting on these tasks that have a result now are answered from it; those waiting on
# a task that failed for good fail with it. Only once their task is done: while it is queued,
# running or failed, the result there is the entry a cache refresh is replacing, and a refreshing
# request must get the new rows. Found through ix_requests_pending_key: only the keys given.
RESOLVE_SQL = with_counters(
    """
    WITH done AS (
        UPDATE requests r SET state = 'done', result_key = r.cache_key
          FROM results res
         WHERE r.cache_key = ANY(CAST(:keys AS text[])) AND r.state = 'pending' AND res.cache_key = r.cache_key
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.key = r.cache_key AND t.state <> 'done')
        RETURNING r.job_id, r.cache_key, res.prompt_tokens, res.completion_tokens
    ), failed AS (
        UPDATE requests r SET state = 'failed', error = t.errors::text
          FROM tasks t
         WHERE r.cache_key = ANY(CAST(:keys AS text[])) AND r.state = 'pending' AND t.key = r.cache_key
           AND t.state = 'failed'
        RETURNING r.job_id, r.cache_key
    ), moved AS (
        SELECT job_id, cache_key, 'pending' AS from_bucket, 'completed' AS to_bucket, prompt_tokens, completion_tokens
          FROM done
        UNION ALL
        SELECT job_id, cache_key, 'pending', 'failed', 0, 0 FROM failed
    )
    """
)
# A hit records its use, at most once a LAST_USED_RESOLUTION_S per entry (a hot entry is not
# rewritten by every submission), and skips an entry another transaction is touching right now
# (touching is best effort; waiting could deadlock two submissions that hit the same keys).
LAST_USED_RESOLUTION_S = 60
# Every step finds its rows by key, one index probe per key: as `cache_key = ANY(keys)` or as
# a join with the table, the planner chose a sequential scan of every result per 5,000-key
# batch (and a hash join over a second one) at 10^5-10^6 entries. A LATERAL ... LIMIT 1 is
# never flattened into a join, so it stays a probe per key whatever the statistics say.
USE_RESULTS_SQL = sa.text(
    """
    WITH hit AS (
        SELECT entry.* FROM unnest(string_to_array(:keys, ',')) AS wanted(key)
         CROSS JOIN LATERAL (SELECT cache_key, prompt_tokens, completion_tokens, last_used_at FROM results
                              WHERE cache_key = wanted.key LIMIT 1 FOR KEY SHARE) entry
    ), stale AS (
        SELECT cache_key FROM results
         WHERE cache_key = ANY(ARRAY(SELECT cache_key FROM hit
                                      WHERE last_used_at < now() - make_interval(secs => :resolution_s)))
           FOR NO KEY UPDATE SKIP LOCKED
    ), touched AS (
        UPDATE results SET last_used_at = now() WHERE cache_key = ANY(ARRAY(SELECT cache_key FROM stale))
    )
    SELECT cache_key, prompt_tokens, completion_tokens FROM hit
    """
)
# The cache as users see it. Bypass jobs index their rows under private keys that no lookup
# can find, so those are not entries. A hit is a request answered from the cache at
# submission; a miss is a request of a job that looked (cache "use") and was not. Summed from
# the jobs' counters (one row per job, never per request).
CACHE_ENTRIES_SQL = sa.text(
    "SELECT count(*) FROM (SELECT 1 FROM results WHERE cache_key NOT LIKE 'bypass-%' LIMIT :cap) capped"
)
CACHE_LOOKUPS_SQL = sa.text(
    """
    SELECT COALESCE(sum(n_cached), 0) AS hits,
           COALESCE(sum(total - n_cached) FILTER (WHERE cache_policy = 'use'), 0) AS misses,
           COALESCE(sum(cached_prompt_tokens), 0) AS prompt_tokens_saved,
           COALESCE(sum(cached_completion_tokens), 0) AS completion_tokens_saved
      FROM jobs
     WHERE CAST(:tenant AS text) IS NULL OR tenant = :tenant
    """
)
# The cache is a cache: entries whose shard is gone or damaged are dropped with the shard row.
# First the requests of unfinished jobs that were answered by them go back to the queue (their
# jobs' counters and spend, and their tasks' waiters, kept in the same statement; a job that
# was finalizing goes back to running), while the entries still say what they had cost...
REQUEUE_REQUESTS_SQL = with_counters(
    """
    WITH answered AS (
        SELECT r.id, r.job_id, r.cache_key, r.cached, res.prompt_tokens, res.completion_tokens
          FROM requests r
          JOIN jobs j ON j.id = r.job_id
          JOIN results res ON res.cache_key = r.result_key
         WHERE r.result_key = ANY(CAST(:keys AS text[])) AND r.state = 'done'
           AND j.status IN ('queued', 'running', 'finalizing')
           FOR UPDATE OF r
    ), requeued AS (
        UPDATE requests r SET state = 'pending', result_key = NULL, cached = false
          FROM answered a WHERE r.id = a.id
        RETURNING a.job_id, a.cache_key, a.cached, a.prompt_tokens, a.completion_tokens
    ), moved AS (
        SELECT job_id, cache_key, CASE WHEN cached THEN 'cached' ELSE 'completed' END AS from_bucket,
               'pending' AS to_bucket, prompt_tokens, completion_tokens
          FROM requeued
    )
    """
)
# ...then the entries and shard rows go...
DROP_RESULTS_SQL = sa.text("DELETE FROM results WHERE shard_id = ANY(CAST(:shard_ids AS text[])) RETURNING cache_key")
DROP_RESULT_SHARDS_SQL = sa.text("DELETE FROM shards WHERE id = ANY(CAST(:shard_ids AS text[])) AND kind = 'result'")
# ...and their tasks are run again from scratch (a fresh attempt budget: the failure was
# storage's) where requests wait on them, or left idle for a later submission.
REQUEUE_TASKS_SQL = sa.text(
    """
    UPDATE tasks SET state = CASE WHEN waiters > 0 THEN 'pending' ELSE 'idle' END, attempts = 0,
           errors = '[]'::jsonb, finished_at = NULL, lease_owner = NULL, lease_expires_at = NULL
     WHERE key = ANY(CAST(:keys AS text[])) AND state IN ('done', 'failed', 'idle')
    """
)
# Which keys these shards hold entries for (before the entries are dropped).
SHARD_KEYS_SQL = sa.text("SELECT cache_key FROM results WHERE shard_id = ANY(CAST(:shard_ids AS text[]))")

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


class AssemblyRow(NamedTuple):
    """One request of a job as assembly sees it; `shard_path` is None for an unanswered one (a
    tuple: a window builds thousands of them, a frozen dataclass took 2 µs each)."""

    request_index: int
    custom_id: str
    state: str
    cached: bool
    cache_key: str
    error: str | None
    shard_path: str | None
    row_start: int | None
    row_count: int | None
    parameters: dict[str, Any] | None = None  # the request's own parameters, where they differ from the job's


class ResultRepository:
    def __init__(self, session: orm.Session) -> None:
        self.session = session

    def results_for(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        """The keys with a cache entry, with its (prompt, completion) tokens; each now recorded as
        used (least-recently-used eviction) and held (FOR KEY SHARE) until this transaction ends,
        so no eviction removes an entry a submission is answering requests from."""
        if not keys:
            return {}
        rows = self.session.execute(USE_RESULTS_SQL, {"keys": joined_keys(keys), "resolution_s": LAST_USED_RESOLUTION_S})
        return {key: (int(p), int(c)) for key, p, c in rows}

    def add_results(self, rows: list[dict[str, Any]]) -> None:
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

    def resolve_requests(self, keys: list[str]) -> set[str]:
        """Answer the requests waiting on these tasks from their results, or fail them with a task
        that failed for good, keeping the counters; the jobs touched (each moved on to
        finalizing once nothing of it is pending)."""
        if not keys:
            return set()
        return set(self.session.scalars(RESOLVE_SQL, {"keys": sorted(set(keys))}))

    def prompts_for(self, keys: list[str]) -> dict[str, list[int]]:
        rows = self.session.execute(sa.select(Task.key, Task.prompt_token_ids).where(Task.key == any_key(keys)))
        return dict(rows.all())

    def cache_stats(self, tenant: str | None = None) -> dict[str, int]:
        """Entries of the shared cache; hits and misses of one tenant's requests (all when None)."""
        entries = bounded_count(self.session, CACHE_ENTRIES_SQL, "pk_results")
        lookups = self.session.execute(CACHE_LOOKUPS_SQL, {"tenant": tenant}).mappings().one()
        return {"entries": entries, **{name: int(value) for name, value in lookups.items()}}

    def job_result_shards(self, job_id: str) -> list[SourceShard]:
        return [SourceShard(*row) for row in self.session.execute(JOB_RESULT_SHARDS_SQL, {"job_id": job_id})]

    def assembly_rows(self, job_id: str, after_index: int, limit: int) -> list[AssemblyRow]:
        """The requests of index range (after_index, after_index + limit], in request order.

        Bounded on both sides, so each window is one index range scan whatever the planner's
        statistics say: right after a 10^6-request submission they still claim the job has a few
        dozen rows, and an open-ended `> after ORDER BY .. LIMIT` was planned as a bitmap scan
        and sort of every later request of the job, per window (354 ms against 22 ms).

        Each request's entry and its shard are looked up by key (LATERAL ... LIMIT 1, which the
        planner cannot turn into a join): as plain joins they were planned as hash joins over a
        sequential scan of every result, per window, at 10^5-10^6 cached results."""
        entry = (sa.select(Result.shard_id, Result.row_start, Result.row_count)
                 .where(Result.cache_key == Request.result_key).limit(1).lateral("entry"))
        shard = sa.select(Shard.path).where(Shard.id == entry.c.shard_id).limit(1).lateral("shard")
        query = (
            sa.select(Request.request_index, Request.custom_id, Request.state, Request.cached, Request.cache_key,
                      Request.error, shard.c.path, entry.c.row_start, entry.c.row_count, Request.parameters)
            .select_from(Request)
            .outerjoin(entry, sa.true())
            .outerjoin(shard, sa.true())
            .where(Request.job_id == job_id, Request.request_index > after_index,
                   Request.request_index <= after_index + limit)
            .order_by(Request.request_index)
        )
        # Core, not the ORM's loading: its per-row machinery took two thirds of the window's time.
        return [AssemblyRow._make(row) for row in self.session.connection().execute(query).all()]

    def drop_damaged_shards(self, shard_ids: list[str]) -> set[str]:
        """Drop the cache entries of these result shards and requeue what they answered; the jobs
        sent back to wait for their requests."""
        keys = sorted(self.session.scalars(SHARD_KEYS_SQL, {"shard_ids": shard_ids}))
        job_ids = set(self.session.scalars(REQUEUE_REQUESTS_SQL, {"keys": keys})) if keys else set()
        self.session.execute(DROP_RESULTS_SQL, {"shard_ids": shard_ids})
        self.session.execute(DROP_RESULT_SHARDS_SQL, {"shard_ids": shard_ids})
        if keys:
            self.session.execute(REQUEUE_TASKS_SQL, {"keys": keys})
            announce(self.session, TASKS_QUEUED, ANY)
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
