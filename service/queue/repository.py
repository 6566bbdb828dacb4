"""Every SQL statement of the task queue. Callers own the transaction.

The claim is one statement: `FOR UPDATE SKIP LOCKED` over claimable tasks (pending, or for a
suspect leased with an expired lease), granting a lease with an owner, an expiry and a fencing
token from a sequence. A task is pending only while some request waits on it (`waiters`, kept by
the statements that move requests); one nobody waits for (its jobs were cancelled or expired)
is `idle`, outside the claim's index, so a claim never visits it. Completion and failure check
the fencing token: a worker whose lease was re-granted to another cannot commit anything for
that task.

Fairness: round-robin by job. Each task gets a `turn` when it is queued: the claim frontier (the
lowest turn still pending for its teacher) plus its position in its submission; the claim takes
the lowest turns first. A job submitted while another's 10^7 tasks wait starts at the frontier,
so from then on the two alternate, one task each, instead of the new one waiting behind the
whole backlog; k jobs take one turn each, and no stream of new jobs can push an old one back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from service.db import copy_cursor
from service.notify import ANY, TASKS_QUEUED, announce
from service.states import TaskState

# The claim's update of the candidates it picked: a lease with an owner, an expiry and a token.
LEASE_TEMPLATE = """
    UPDATE tasks t
       SET state = 'leased',
           lease_owner = :owner,
           lease_expires_at = now() + make_interval(secs => :lease_s),
           lease_token = nextval('lease_token_seq'),
           attempts = t.attempts + 1
      FROM candidates c
     WHERE t.key = c.key
    RETURNING t.key, t.lease_token, t.mode, t.prompt_token_ids, t.response_token_ids,
              t.sampling, t.top_logprobs, t.attempts, t.max_attempts, t.messages, t.interactive
"""
CLAIMABLE = "t.teacher = :teacher AND t.attempts < t.max_attempts AND t.waiters > 0"

# Non-suspects: pending only (expired leases were requeued just before, by REQUEUE_LOST_SQL),
# lowest turn first. The interactive lane first (the synchronous endpoints' tasks, through the
# partial index ix_tasks_claim_interactive), at most :interactive_limit of them, so a claim
# always leaves batch work some of its room (the worker passes a share of its room: batch jobs
# progress however many interactive requests arrive); then batch tasks through ix_tasks_claim
# (teacher, turn, key), in its order, up to what is left of :limit and at most :batch_limit (the
# worker keeps room for interactive work). Each walk stops at its limit, whatever the backlog.
CLAIM_SQL = sa.text(
    f"""
    WITH interactive AS (
        SELECT t.key FROM tasks t
        WHERE {CLAIMABLE} AND t.state = 'pending' AND NOT t.suspect AND t.interactive
        ORDER BY t.turn, t.key
        LIMIT :interactive_limit
        FOR UPDATE OF t SKIP LOCKED
    ), batch AS (
        SELECT t.key FROM tasks t
        WHERE {CLAIMABLE} AND t.state = 'pending' AND NOT t.suspect AND NOT t.interactive
        ORDER BY t.turn, t.key
        LIMIT LEAST(:batch_limit, :limit - (SELECT count(*) FROM interactive))
        FOR UPDATE OF t SKIP LOCKED
    ), candidates AS (
        SELECT key FROM interactive UNION ALL SELECT key FROM batch
    )
    {LEASE_TEMPLATE}
    """
)
# Suspects: the pending or expired-leased ones, oldest first, through ix_tasks_suspect.
CLAIM_SUSPECT_SQL = sa.text(
    f"""
    WITH candidates AS (
        SELECT t.key FROM tasks t
        WHERE {CLAIMABLE}
          AND t.suspect AND (t.state = 'pending' OR (t.state = 'leased' AND t.lease_expires_at < now()))
        ORDER BY t.created_at, t.key
        LIMIT :limit
        FOR UPDATE OF t SKIP LOCKED
    )
    {LEASE_TEMPLATE}
    """
)

# What a task released by its worker becomes: pending while requests wait on it, else idle.
RENEW_SQL = sa.text(
    """
    UPDATE tasks t SET lease_expires_at = now() + make_interval(secs => :lease_s)
      FROM unnest(CAST(:keys AS text[]), CAST(:tokens AS bigint[])) AS held(key, token)
     WHERE t.key = held.key AND t.lease_token = held.token AND t.state = 'leased'
    RETURNING t.key
    """
)

# Fenced: only the holder of the current token moves a leased task on.
FINISH_SQL = sa.text(
    """
    UPDATE tasks t SET state = 'done', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL
      FROM unnest(CAST(:keys AS text[]), CAST(:tokens AS bigint[])) AS held(key, token)
     WHERE t.key = held.key AND t.lease_token = held.token AND t.state = 'leased'
    RETURNING t.key
    """
)

RECORD_FAILURE_SQL = sa.text(
    """
    UPDATE tasks SET
        state = CASE WHEN attempts >= max_attempts OR :final THEN 'failed' WHEN waiters > 0 THEN 'pending'
                     ELSE 'idle' END,
        errors = errors || jsonb_build_array(jsonb_build_object('attempt', attempts, 'error', CAST(:error AS text))),
        lease_owner = NULL, lease_expires_at = NULL,
        finished_at = CASE WHEN attempts >= max_attempts OR :final THEN now() END
    WHERE key = :key AND lease_token = :token AND state = 'leased'
    RETURNING state
    """
)

# Releasing after an engine failure counts the attempt (and fails a task out of attempts);
# after a clean shutdown it does not.
RELEASE_SQL = sa.text(
    """
    UPDATE tasks t SET
        state = CASE WHEN CAST(:error AS text) IS NOT NULL AND t.attempts >= t.max_attempts THEN 'failed'
                     WHEN t.waiters > 0 THEN 'pending' ELSE 'idle' END,
        finished_at = CASE WHEN CAST(:error AS text) IS NOT NULL AND t.attempts >= t.max_attempts THEN now() END,
        lease_owner = NULL, lease_expires_at = NULL,
        suspect = t.suspect OR CAST(:error AS text) IS NOT NULL,
        attempts = CASE WHEN CAST(:error AS text) IS NOT NULL THEN t.attempts ELSE GREATEST(t.attempts - 1, 0) END,
        errors = CASE WHEN CAST(:error AS text) IS NULL THEN t.errors ELSE t.errors || jsonb_build_array(
            jsonb_build_object('attempt', t.attempts, 'error', CAST(:error AS text))) END
      FROM unnest(CAST(:keys AS text[]), CAST(:tokens AS bigint[])) AS held(key, token)
     WHERE t.key = held.key AND t.lease_token = held.token AND t.state = 'leased'
    RETURNING t.key
    """
)

# A lease lost while the task ran among others (its worker died: a spot node preempted, a kill
# -9) is no evidence against the task: the attempt the claim counted is given back, and the
# task becomes a suspect, which runs alone. Only a death while it runs alone counts (below), so
# churn never fails an innocent request and one that kills workers still runs out of attempts
# (it is a suspect at most once without counting: the bound). Bounded by the lease-expiry index.
REQUEUE_LOST_SQL = sa.text(
    """
    WITH lost AS (
        SELECT key FROM tasks
        WHERE state = 'leased' AND lease_expires_at < now() AND NOT suspect AND teacher = :teacher
        ORDER BY lease_expires_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t SET state = CASE WHEN t.waiters > 0 THEN 'pending' ELSE 'idle' END, suspect = true,
        lease_owner = NULL, lease_expires_at = NULL,
        attempts = GREATEST(t.attempts - 1, 0),
        errors = t.errors || jsonb_build_array(jsonb_build_object(
            'attempt', t.attempts, 'error', 'lease lost among other tasks (the worker died); not counted, run alone next'))
      FROM lost WHERE t.key = lost.key
    RETURNING t.key
    """
)

SUSPECT_WAITING_SQL = sa.text(
    """
    SELECT EXISTS (
        SELECT 1 FROM tasks t
        WHERE t.teacher = :teacher AND t.suspect AND t.attempts < t.max_attempts AND t.waiters > 0
          AND (t.state = 'pending' OR (t.state = 'leased' AND t.lease_expires_at < now())))
    """
)

# A suspect whose leases expired on its last attempt (it kept killing the workers it ran alone
# on) fails for good. A non-suspect's lost lease is requeued above, never failed here.
EXPIRE_EXHAUSTED_SQL = sa.text(
    """
    UPDATE tasks SET state = 'failed', finished_at = now(), lease_owner = NULL,
        errors = errors || jsonb_build_array(jsonb_build_object(
            'attempt', attempts, 'error', 'lease expired while it ran alone: the worker died or stalled')),
        lease_expires_at = NULL
    WHERE state = 'leased' AND lease_expires_at < now() AND attempts >= max_attempts AND suspect
    RETURNING key
    """
)


# Tasks are COPYed into a temporary table of the transaction, then inserted from it in one
# statement however many there are (a row per task through executemany cost 18 s for a
# 100,000-prompt job; arrays of parameters spent most of a 10^6-request submission quoting them).
# A task already there gains the new waiters; one that failed (or, refreshing, finished) is
# tried afresh, and an idle one is pending again; both take their turn from the frontier.
# Returns every task's state after: `done` means it finished while this submission was being
# written, and its requests are answered from it at once.
STAGE_TASKS_SQL = sa.text(
    """
    CREATE TEMPORARY TABLE IF NOT EXISTS staged_tasks (
        key text, teacher text, mode text, prompt_token_ids integer[], response_token_ids integer[],
        sampling jsonb, top_logprobs integer, max_attempts integer, messages jsonb, waiters integer,
        position integer, interactive boolean) ON COMMIT DROP
    """
)
COPY_STAGED_TASKS_SQL = "COPY staged_tasks FROM STDIN"
ENQUEUE_SQL = sa.text(
    """
    WITH frontier AS (
        SELECT COALESCE(min(turn), 0) AS turn FROM tasks
         WHERE teacher = :teacher AND state = 'pending' AND NOT suspect
    ), upserted AS (
    INSERT INTO tasks AS t (key, teacher, state, mode, prompt_token_ids, response_token_ids, sampling,
                            top_logprobs, max_attempts, messages, waiters, turn, interactive)
    SELECT s.key, s.teacher, 'pending', s.mode, s.prompt_token_ids, s.response_token_ids, s.sampling,
           s.top_logprobs, s.max_attempts, s.messages, s.waiters, frontier.turn + s.position - 1, s.interactive
      FROM frontier, staged_tasks s
     ORDER BY s.key
    ON CONFLICT (key) DO UPDATE
       SET waiters = t.waiters + excluded.waiters,
           -- An interactive request joining a queued batch task moves it to the interactive lane.
           interactive = t.interactive OR excluded.interactive,
           state = CASE WHEN t.state = ANY(CAST(:rerun_states AS text[])) OR t.state = 'idle' THEN 'pending'
                        ELSE t.state END,
           turn = CASE WHEN t.state = ANY(CAST(:rerun_states AS text[])) OR t.state = 'idle' THEN excluded.turn
                       ELSE t.turn END,
           attempts = CASE WHEN t.state = ANY(CAST(:rerun_states AS text[])) THEN 0 ELSE t.attempts END,
           errors = CASE WHEN t.state = ANY(CAST(:rerun_states AS text[])) THEN '[]'::jsonb ELSE t.errors END,
           finished_at = CASE WHEN t.state = ANY(CAST(:rerun_states AS text[])) THEN NULL ELSE t.finished_at END,
           created_at = CASE WHEN t.state = ANY(CAST(:rerun_states AS text[])) THEN now() ELSE t.created_at END
    RETURNING t.key, t.state
    )
    -- Not every key back (a 10^7-request job would ship each one to Python): the done ones, and
    -- one row (key null) if any is pending.
    SELECT key, state FROM upserted WHERE state = 'done'
    UNION ALL
    (SELECT NULL, state FROM upserted WHERE state = 'pending' LIMIT 1)
    """
)
CLEAR_STAGED_TASKS_SQL = sa.text("TRUNCATE staged_tasks")


# The fleet's autoscaling signal for one teacher: claimable tasks (pending: a request still
# waits on them, since a task nobody waits for is idle) and leased ones, each counted up to :cap.
# Each walks a partial index of its own (ix_tasks_claim, ix_tasks_suspect, ix_tasks_lease_expiry)
# and stops at :cap rows, so the cost is bounded whatever the table holds; a scaler only needs
# to know "at least enough for every replica it may start".
PENDING_WORK_SQL = sa.text(
    """
    SELECT
      (SELECT count(*) FROM (
          SELECT 1 FROM tasks WHERE teacher = :teacher AND state = 'pending' AND NOT suspect
           ORDER BY turn, key LIMIT :cap) AS p)
      + (SELECT count(*) FROM (
          SELECT 1 FROM tasks WHERE teacher = :teacher AND state = 'pending' AND suspect
           ORDER BY created_at LIMIT :cap) AS s) AS pending,
      (SELECT count(*) FROM (
          SELECT 1 FROM tasks WHERE teacher = :teacher AND state = 'leased' LIMIT :cap) AS l) AS leased
    """
)


# The autoscalers' per-teacher figures (/metrics), each bounded: leases are in flight only (the
# partial lease index); the queue's head is the first :cap tasks in claim order (ix_tasks_claim).
# Idle tasks (nobody waits on them: their jobs were cancelled or expired) older than the
# retention: deleted a bounded batch at a time, by their own partial index. A later submission of
# the same request queues it afresh (its prompt comes with it), so nothing is lost but attempts.
# The batch is chosen once (MATERIALIZED): as `key IN (SELECT ... LIMIT)` the planner may rescan
# the subquery per row, and tasks tied on created_at then make each rescan pick others.
DELETE_IDLE_TASKS_SQL = sa.text(
    f"""
    WITH doomed AS MATERIALIZED (
        SELECT key FROM tasks WHERE state = '{TaskState.IDLE}' AND created_at < now() - make_interval(secs => :age_s)
         ORDER BY created_at LIMIT :limit FOR UPDATE SKIP LOCKED)
    DELETE FROM tasks t USING doomed d WHERE t.key = d.key AND t.state = '{TaskState.IDLE}'
    """
)
LEASES_BY_TEACHER_SQL = sa.text(f"SELECT teacher, count(*) FROM tasks WHERE state = '{TaskState.LEASED}' GROUP BY teacher")
QUEUE_HEAD_SQL = sa.text(
    f"""
    SELECT count(*) AS tasks, EXTRACT(EPOCH FROM now() - min(created_at)) AS oldest_age_s,
           COALESCE(sum(cardinality(prompt_token_ids) + COALESCE(cardinality(response_token_ids), 0)
                        + CASE WHEN mode = 'generate'
                               THEN CAST(sampling->>'max_tokens' AS bigint) * CAST(sampling->>'n' AS bigint)
                               ELSE 0 END), 0) AS tokens
      FROM (SELECT created_at, prompt_token_ids, response_token_ids, mode, sampling FROM tasks
             WHERE teacher = :teacher AND state = '{TaskState.PENDING}' AND NOT suspect
             ORDER BY turn, key LIMIT :cap) head
    """
)


@dataclass(frozen=True)
class QueueHead:
    """The first tasks (at most a cap) a teacher's workers will claim next."""

    tasks: int
    oldest_age_s: float  # how long the oldest of them has waited (0: none waits)
    tokens: int  # the most teacher tokens they can cost: prompts (+ responses) + max_tokens x n


@dataclass(frozen=True)
class PendingWork:
    """One teacher's outstanding work, each count capped (see PENDING_WORK_SQL)."""

    pending: int  # claimable tasks waiting for a worker
    leased: int  # tasks a worker holds (running, or a lease about to expire and be re-claimed)

    @property
    def outstanding(self) -> int:
        return self.pending + self.leased


@dataclass(frozen=True)
class ClaimedTask:
    key: str
    lease_token: int
    mode: str
    prompt_token_ids: list[int]
    response_token_ids: list[int] | None
    sampling: dict[str, Any]
    top_logprobs: int
    attempts: int
    max_attempts: int
    messages: list[dict[str, Any]] | None = None  # only for a teacher behind a chat endpoint
    interactive: bool = False  # the synchronous endpoints wait on it: flushed as soon as it ends


@dataclass(frozen=True)
class NewTask:
    key: str
    teacher: str
    mode: str
    prompt_token_ids: list[int]
    response_token_ids: list[int] | None
    sampling: dict[str, Any]
    top_logprobs: int
    max_attempts: int
    messages: list[dict[str, Any]] | None = None
    interactive: bool = False
    # The prompt's ids joined by commas, where the caller has them already (a file job's read-ahead
    # thread joins each prompt once, for its cache key and its array literal).
    prompt_joined: str | None = None


def task_rows(tasks: list[NewTask], waiters: dict[str, int]) -> Iterator[tuple[Any, ...]]:
    """staged_tasks rows, in the given order (their position is their turn's offset). Token lists
    go as array literals, and a job's one sampling dict is encoded once, not once a task."""
    encoded: dict[int, str] = {}
    for position, t in enumerate(tasks, start=1):
        sampling = encoded.get(id(t.sampling))
        if sampling is None:
            sampling = encoded[id(t.sampling)] = json.dumps(t.sampling)
        yield (t.key, t.teacher, t.mode, array_literal(t.prompt_token_ids, t.prompt_joined),
               None if t.response_token_ids is None else array_literal(t.response_token_ids), sampling,
               t.top_logprobs, t.max_attempts,
               # Null for every teacher but a chat endpoint's, so other jobs pay nothing for it.
               None if t.messages is None else json.dumps(t.messages), waiters[t.key], position,
               t.interactive)


def array_literal(ids: list[int], joined: str | None = None) -> str:
    """`ids` as a Postgres array literal (`joined`: the ids already joined by commas)."""
    return "{" + (",".join(map(str, ids)) if joined is None else joined) + "}"


def storable_error(text: str) -> str:
    """An error text JSONB can hold: a remote teacher's excerpt may carry NUL, which Postgres
    text refuses (and the insert would fail the whole write batch)."""
    return text.replace("\x00", "\\u0000")


class TaskRepository:
    def __init__(self, session: orm.Session) -> None:
        self.session = session

    def claim(self, teacher: str, owner: str, limit: int, lease_s: float, suspect: bool = False,
              interactive_limit: int | None = None, batch_limit: int | None = None) -> list[ClaimedTask]:
        """Lease up to `limit` tasks, interactive ones first (at most `interactive_limit`, default
        all of `limit`), then batch ones (at most `batch_limit`, default all that is left); with
        `suspect`, only tasks that were in a dying engine."""
        self.requeue_lost(teacher)  # before the claim, so a lost lease is never re-claimed as counted work
        params = {"teacher": teacher, "owner": owner, "limit": limit, "lease_s": lease_s,
                  "interactive_limit": limit if interactive_limit is None else interactive_limit,
                  "batch_limit": limit if batch_limit is None else batch_limit}
        rows = self.session.execute(CLAIM_SUSPECT_SQL if suspect else CLAIM_SQL, params).mappings().all()
        return [ClaimedTask(**row) for row in rows]

    def delete_idle(self, age_s: float, limit: int) -> int:
        """Delete up to `limit` idle tasks created more than `age_s` seconds ago."""
        result = self.session.execute(DELETE_IDLE_TASKS_SQL, {"age_s": age_s, "limit": limit})
        return int(result.rowcount)  # type: ignore[attr-defined]

    def pending_by_teacher(self, teacher: str, cap: int) -> PendingWork:
        """The teacher's pending and leased task counts, each at most `cap` (the autoscaling signal)."""
        row = self.session.execute(PENDING_WORK_SQL, {"teacher": teacher, "cap": cap}).one()
        return PendingWork(pending=row.pending, leased=row.leased)

    def leases_by_teacher(self) -> dict[str, int]:
        return {teacher: int(n) for teacher, n in self.session.execute(LEASES_BY_TEACHER_SQL)}

    def queue_head(self, teacher: str, cap: int) -> QueueHead:
        row = self.session.execute(QUEUE_HEAD_SQL, {"teacher": teacher, "cap": cap}).one()
        return QueueHead(tasks=int(row.tasks), oldest_age_s=float(row.oldest_age_s or 0.0), tokens=int(row.tokens))

    def requeue_lost(self, teacher: str, limit: int = 1000) -> list[str]:
        requeued = list(self.session.execute(REQUEUE_LOST_SQL, {"teacher": teacher, "limit": limit}).scalars())
        if requeued:
            announce(self.session, TASKS_QUEUED, teacher)
        return requeued

    def suspect_waiting(self, teacher: str) -> bool:
        return bool(self.session.execute(SUSPECT_WAITING_SQL, {"teacher": teacher}).scalar())

    def renew(self, held: dict[str, int], lease_s: float) -> set[str]:
        """Extend the leases still ours; return the keys we still hold."""
        return set(self._fenced(RENEW_SQL, held, lease_s=lease_s))

    def finish(self, held: dict[str, int]) -> set[str]:
        return set(self._fenced(FINISH_SQL, held))

    def release(self, held: dict[str, int], error: str | None = None) -> set[str]:
        """Give leased tasks back. After a clean shutdown the attempt does not count; after an
        engine failure (`error`) it does, and the tasks become suspects (each is then run alone), so a
        request that kills engines runs out of attempts without taking its neighbours along."""
        released = set(self._fenced(RELEASE_SQL, held, error=None if error is None else storable_error(error)))
        if released:  # some may be pending again, for another worker
            announce(self.session, TASKS_QUEUED, ANY)
        return released

    def record_failure(self, key: str, token: int, error: str, final: bool = False) -> str | None:
        """Record a failed attempt; return the task's new state, or None if the lease was lost."""
        params = {"key": key, "token": token, "error": storable_error(error), "final": final}
        state = self.session.execute(RECORD_FAILURE_SQL, params).scalar_one_or_none()
        if state == TaskState.PENDING:  # to be retried, by any worker
            announce(self.session, TASKS_QUEUED, ANY)
        return state

    def expire_exhausted(self) -> list[str]:
        return list(self.session.execute(EXPIRE_EXHAUSTED_SQL).scalars())

    def _fenced(self, statement: sa.TextClause, held: dict[str, int], **params: Any) -> list[str]:
        if not held:
            return []
        keys = sorted(held)  # one lock order for every statement over many tasks: no deadlocks
        tokens = [held[key] for key in keys]
        return list(self.session.execute(statement, {"keys": keys, "tokens": tokens, **params}).scalars())

    def enqueue(self, tasks: list[NewTask], waiters: dict[str, int], recompute_done: bool) -> list[str]:
        """Insert tasks, each waited on by `waiters[key]` new requests; one already queued or
        leased is joined, one that failed is tried afresh, an idle one is pending again. With
        `recompute_done` (cache refresh) a finished task is queued again too. `tasks` must have
        distinct keys (one statement cannot upsert a row twice), all of one teacher.

        Returns the keys whose task is done (it finished while this submission was written)."""
        if not tasks:
            return []
        tasks = sorted(tasks, key=lambda t: t.key)  # one lock order with the workers' statements
        self.session.execute(STAGE_TASKS_SQL)
        with copy_cursor(self.session) as cursor:
            with cursor.copy(COPY_STAGED_TASKS_SQL) as copy:
                for row in task_rows(tasks, waiters):
                    copy.write_row(row)
        rerun = [TaskState.FAILED, TaskState.DONE] if recompute_done else [TaskState.FAILED]
        states = self.session.execute(ENQUEUE_SQL, {"teacher": tasks[0].teacher, "rerun_states": rerun}).all()
        self.session.execute(CLEAR_STAGED_TASKS_SQL)
        if any(state == TaskState.PENDING for _, state in states):
            announce(self.session, TASKS_QUEUED, tasks[0].teacher)
        return [key for key, state in states if state == TaskState.DONE]
