"""The schema: jobs, their requests, the task queue, the result (cache) index and shards.

A *request* is what a user submitted (one row per job and batch position). A *task* is one
unit of teacher work, keyed by the request's cache key, so requests with one key (within a
job or across jobs in flight) share one task and are computed once. Tasks carry the lease.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from service.states import JobStatus, RequestState, TaskState, check_in, sql_list


class Base(orm.DeclarativeBase):
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
        }
    )


# Source of fencing tokens (Task.lease_token).
lease_token_seq = sa.Sequence("lease_token_seq", metadata=Base.metadata)

TIMESTAMP = sa.DateTime(timezone=True)
NOW = sa.text("now()")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # A retried submission is recognised within its tenant: two tenants may pick the same key.
        sa.UniqueConstraint("tenant", "idempotency_key"),
        sa.Index("ix_jobs_tenant_created_at", "tenant", "created_at"),
        sa.Index("ix_jobs_tenant_status_created_at", "tenant", "status", "created_at"),  # a filtered jobs list
        # Retention: the oldest finished jobs first, without looking at unfinished ones.
        sa.Index("ix_jobs_finished_at", "finished_at", postgresql_where=sa.text("finished_at IS NOT NULL")),
        check_in("status", JobStatus),
        # A tenant's pending work (its limit) sums the counters of its unfinished jobs only.
        sa.Index("ix_jobs_tenant_active", "tenant", postgresql_where=sa.text("status IN ('queued', 'running')")),
    )

    id: orm.Mapped[str] = orm.mapped_column(sa.String(40), primary_key=True)
    # Whose job: every read of it, its requests and its shards is filtered by this.
    tenant: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("tenants.name"))
    status: orm.Mapped[str] = orm.mapped_column(sa.String(16), index=True)  # JobStatus
    teacher: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    mode: orm.Mapped[str] = orm.mapped_column(sa.String(16))
    top_logprobs: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    sampling: orm.Mapped[dict[str, Any]] = orm.mapped_column(JSONB)
    cache_policy: orm.Mapped[str] = orm.mapped_column(sa.String(16))
    # How its shards deliver the soft labels ({"encoding": ...}); NULL (older jobs): float32.
    soft_labels: orm.Mapped[dict[str, Any] | None] = orm.mapped_column(JSONB)
    metadata_: orm.Mapped[dict[str, Any]] = orm.mapped_column("metadata", JSONB)
    total: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    idempotency_key: orm.Mapped[str | None] = orm.mapped_column(sa.String(200))
    body_sha256: orm.Mapped[str] = orm.mapped_column(sa.String(64))
    error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    created_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW, index=True)
    started_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    finished_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    # Maintained counters: every statement that moves a request between states adjusts them in
    # the same statement (service/jobs/repository.py), so a status poll reads this row only and
    # they never drift from a recount. n_pending reaching 0 moves the job on to finalizing.
    n_pending: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    n_completed: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    n_cached: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    n_failed: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    n_cancelled: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    # The spend: tokens of the distinct results that answered the job (a duplicate within the
    # job is one computation), computed for it ("sent") or answered from the cache at submission.
    sent_prompt_tokens: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    sent_completion_tokens: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    cached_prompt_tokens: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    cached_completion_tokens: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    # When it last became ready for assembly (nothing pending): the finalizer's lag in /metrics.
    ready_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    # Set by cancel: the job is assembled with what was done, then ends `cancelled`.
    cancel_requested_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    # Assembly that failed: how often, and not again before this (a backoff), so one job that
    # cannot be assembled never stops the finalizers; past the bound it ends `failed`.
    finalize_attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    finalize_not_before: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    # A job of the synchronous endpoints (service/online): its caller got the answer from the
    # result shards, so the finalizer ends it without assembling job shards nobody downloads.
    interactive: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, server_default=sa.false())


class Request(Base):
    __tablename__ = "requests"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "request_index"),
        # By job and state, for the states a lookup asks for: never `done`, where nearly all end.
        sa.Index("ix_requests_job_id_unsettled", "job_id", "state",
                 postgresql_where=sa.text(f"state <> '{RequestState.DONE}'")),
        sa.Index("ix_requests_pending_key", "cache_key",
                 postgresql_where=sa.text(f"state = '{RequestState.PENDING}'")),
        # Which requests an entry answered: eviction spares entries an unfinished job reads, and
        # a file job's later batch finds the hits its earlier ones counted (job_id second).
        sa.Index("ix_requests_result_key", "result_key", "job_id", postgresql_where=sa.text("result_key IS NOT NULL")),
        check_in("state", RequestState),
    )

    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    job_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    request_index: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    custom_id: orm.Mapped[str] = orm.mapped_column(sa.String(512))
    cache_key: orm.Mapped[str] = orm.mapped_column(sa.String(80))
    state: orm.Mapped[str] = orm.mapped_column(sa.String(16))  # RequestState
    cached: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, server_default=sa.false())
    result_key: orm.Mapped[str | None] = orm.mapped_column(sa.String(80))
    error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    prompt_tokens: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    # What this request runs with that differs from its job's defaults ({"sampling": {...},
    # "top_logprobs": k}, and the OpenAI layer's notes); NULL: the job's. Copied into its shard rows.
    parameters: orm.Mapped[dict[str, Any] | None] = orm.mapped_column(JSONB)


class Task(Base):
    """One computation on the teacher, leased by one worker at a time."""

    __tablename__ = "tasks"
    __table_args__ = (
        # The claim's walk: pending non-suspects, lowest turn first (round-robin by job), in the
        # claim's exact order (turn, key), so LIMIT stops the walk: no sort of the backlog.
        sa.Index("ix_tasks_claim", "teacher", "turn", "key",
                 postgresql_where=sa.text(f"state = '{TaskState.PENDING}' AND NOT suspect")),
        # The interactive lane's walk (the synchronous endpoints' tasks), claimed ahead of batch work.
        sa.Index("ix_tasks_claim_interactive", "teacher", "turn", "key",
                 postgresql_where=sa.text(f"state = '{TaskState.PENDING}' AND NOT suspect AND interactive")),
        sa.Index("ix_tasks_lease_expiry", "lease_expires_at",
                 postgresql_where=sa.text(f"state = '{TaskState.LEASED}'")),
        # Retention's walk over idle tasks, oldest first (service/results/retention.py).
        sa.Index("ix_tasks_idle", "created_at", postgresql_where=sa.text(f"state = '{TaskState.IDLE}'")),
        sa.Index("ix_tasks_suspect", "teacher", "created_at",
                 postgresql_where=sa.text(f"suspect AND state IN ({sql_list((TaskState.PENDING, TaskState.LEASED))})")),
        check_in("state", TaskState),
    )

    key: orm.Mapped[str] = orm.mapped_column(sa.String(80), primary_key=True)
    teacher: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    # TaskState. `idle`: pending, but no request waits on it any more (its jobs were cancelled or
    # expired): never claimed, never visited by a claim, pending again when a new submission waits on it.
    state: orm.Mapped[str] = orm.mapped_column(sa.String(16))
    # How many pending requests wait on this task, kept by the same statements that move them.
    waiters: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    # Its place in the claim order: the claim frontier when it was queued plus its position in
    # its submission (service/queue/repository.py: round-robin by job).
    turn: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    mode: orm.Mapped[str] = orm.mapped_column(sa.String(16))
    prompt_token_ids: orm.Mapped[list[int]] = orm.mapped_column(ARRAY(sa.Integer))
    response_token_ids: orm.Mapped[list[int] | None] = orm.mapped_column(ARRAY(sa.Integer))
    sampling: orm.Mapped[dict[str, Any]] = orm.mapped_column(JSONB)
    top_logprobs: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    # The submitted messages, kept only for a teacher behind a chat endpoint (it is sent them).
    messages: orm.Mapped[list[Any] | None] = orm.mapped_column(JSONB)
    attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    max_attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="3")
    errors: orm.Mapped[list[Any]] = orm.mapped_column(JSONB, server_default=sa.text("'[]'::jsonb"))
    # In flight when an engine died: run alone next time, so one poison request fails by itself.
    suspect: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, server_default=sa.false())
    # Some request of the synchronous endpoints (service/online) waits on it: the interactive lane.
    interactive: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, server_default=sa.false())
    lease_owner: orm.Mapped[str | None] = orm.mapped_column(sa.String(200))
    lease_expires_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    # Fencing token: grows with every grant, so a worker whose lease was re-granted cannot commit.
    lease_token: orm.Mapped[int | None] = orm.mapped_column(sa.BigInteger)
    created_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW)
    finished_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)


class Result(Base):
    """The cache index: where the rows computed for one cache key live."""

    __tablename__ = "results"
    # Least-recently-used eviction walks entries from the oldest use.
    __table_args__ = (sa.Index("ix_results_last_used_at", "last_used_at"),)

    cache_key: orm.Mapped[str] = orm.mapped_column(sa.String(80), primary_key=True)
    teacher: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    shard_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("shards.id"), index=True)
    row_start: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    row_count: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    prompt_tokens: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    completion_tokens: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    created_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW)
    # When it was last computed or answered a submission (at most once a minute per entry).
    last_used_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW)


class Shard(Base):
    """A Parquet file in storage: a worker's result shard, or one of a job's output shards."""

    __tablename__ = "shards"
    __table_args__ = (sa.UniqueConstraint("job_id", "shard_index"),)

    id: orm.Mapped[str] = orm.mapped_column(sa.String(40), primary_key=True)
    kind: orm.Mapped[str] = orm.mapped_column(sa.String(16))  # result | job
    job_id: orm.Mapped[str | None] = orm.mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    shard_index: orm.Mapped[int | None] = orm.mapped_column(sa.Integer)
    path: orm.Mapped[str] = orm.mapped_column(sa.String(500))
    rows: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    bytes: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    sha256: orm.Mapped[str] = orm.mapped_column(sa.String(64))
    created_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW)


class JobProgress(Base):
    """A job's counts at one moment while it ran: the status page draws them as a chart, so it
    never counts a job's requests to show its history."""

    __tablename__ = "job_progress"

    job_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, primary_key=True, server_default=NOW)
    completed: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    cached: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    failed: orm.Mapped[int] = orm.mapped_column(sa.Integer)


class CacheUsage(Base):
    """The stored bytes of result shards, in slots a trigger on `shards` keeps (migration 0010):
    the cache's size for its byte budget, read from a few rows, never by summing shards."""

    __tablename__ = "cache_usage"

    slot: orm.Mapped[int] = orm.mapped_column(sa.SmallInteger, primary_key=True, autoincrement=False)
    shards: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    bytes: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")


class Worker(Base):
    """A running worker process: what it serves, when it was last seen, what its engine ran."""

    __tablename__ = "workers"
    # Pruning walks the longest-gone first.
    __table_args__ = (sa.Index("ix_workers_heartbeat_at", "heartbeat_at"),)

    id: orm.Mapped[str] = orm.mapped_column(sa.String(200), primary_key=True)
    teacher: orm.Mapped[str] = orm.mapped_column(sa.String(200), index=True)
    hostname: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    pid: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    stats: orm.Mapped[dict[str, Any]] = orm.mapped_column(JSONB, server_default=sa.text("'{}'::jsonb"))
    started_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW)
    heartbeat_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW)
    stopped_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)


class EngineTotals(Base):
    """What the engines of pruned workers ran, per teacher (so the counters never go down)."""

    __tablename__ = "engine_totals"

    teacher: orm.Mapped[str] = orm.mapped_column(sa.String(200), primary_key=True)
    stats: orm.Mapped[dict[str, Any]] = orm.mapped_column(JSONB, server_default=sa.text("'{}'::jsonb"))


class JobTotals(Base):
    """What ended jobs counted, per teacher, mode and final status: kept by a trigger on jobs
    (migration 0017) as a job ends, and kept when the job's row is deleted, so /metrics sums the
    unfinished jobs and these rows, never every job, and its counters never go down."""

    __tablename__ = "job_totals"

    teacher: orm.Mapped[str] = orm.mapped_column(sa.String(200), primary_key=True)
    mode: orm.Mapped[str] = orm.mapped_column(sa.String(16), primary_key=True)
    status: orm.Mapped[str] = orm.mapped_column(sa.String(16), primary_key=True)  # JobStatus, one of JOB_FINISHED
    jobs: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    n_completed: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    n_cached: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    n_failed: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    n_cancelled: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    sent_prompt_tokens: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    sent_completion_tokens: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    cached_prompt_tokens: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")
    cached_completion_tokens: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, server_default="0")


# Last, once Base is complete: tenants and the OpenAI-compatible tables (files, batches) join the
# same metadata.
from service.openai_batch import models as _openai_models  # noqa: E402,F401
from service.tenants import models as _tenant_models  # noqa: E402,F401
