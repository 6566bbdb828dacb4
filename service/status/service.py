"""The status page's read models: a job's progress and rate, the workers, the cache.

Everything here reads what the service already maintains (job counts, snapshots, worker
heartbeats); the finalizer records a job's progress every `progress_every_s` while it runs.
Services never commit: the request handler or the finalizer loop does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import orm

from service.jobs.schemas import JobOut
from service.results.repository import ResultRepository
from service.status.repository import ProgressPoint as ProgressPoint  # re-exported for the routes
from service.status.repository import StatusRepository, WorkerRow

WORKERS_SHOWN = 200


@dataclass(frozen=True)
class JobPace:
    """How far along a job is and how fast it goes, from its counts and its timestamps."""

    done: int  # completed + cached + failed
    fraction: float
    requests_per_s: float | None
    tokens_per_s: float | None  # completion tokens the teacher generated for this job
    eta_s: float | None


def pace(job: JobOut, now: datetime | None = None) -> JobPace:
    counts = job.counts
    done = counts.completed + counts.cached + counts.failed
    fraction = done / counts.total if counts.total else 1.0
    if job.started_at is None:
        return JobPace(done, fraction, None, None, None)
    end = datetime.fromisoformat(job.finished_at) if job.finished_at else (now or datetime.now(UTC))
    elapsed = max((end - datetime.fromisoformat(job.started_at)).total_seconds(), 1e-3)
    rate = done / elapsed
    tokens = job.spend.completion_tokens_sent / elapsed
    remaining = counts.pending
    eta = remaining / rate if rate > 0 and remaining and job.finished_at is None else None
    return JobPace(done, fraction, rate, tokens, eta)


@dataclass(frozen=True)
class WorkerView:
    row: WorkerRow
    alive: bool
    tokens_per_s: float | None  # completion tokens since the worker started, averaged


@dataclass(frozen=True)
class CacheView:
    entries: int
    bytes: int
    hits: int
    misses: int
    hit_rate: float | None
    tokens_saved: int


class StatusService:
    def __init__(self, session: orm.Session) -> None:
        self.status = StatusRepository(session)
        self.results = ResultRepository(session)

    def progress(self, job_id: str) -> list[ProgressPoint]:
        return self.status.progress(job_id)

    def record_progress(self, every_s: float) -> int:
        """A snapshot of each active job whose last one is older than `every_s`; how many."""
        return self.status.snapshot_active_jobs(every_s)

    def workers(self, seen_within_s: int, alive_within_s: int) -> list[WorkerView]:
        now = datetime.now(UTC)
        views = []
        for row in self.status.workers(seen_within_s, WORKERS_SHOWN):
            alive = row.stopped_at is None and (now - row.heartbeat_at).total_seconds() < alive_within_s
            lifetime = ((row.stopped_at or row.heartbeat_at) - row.started_at).total_seconds()
            tokens = row.stats.get("completion_tokens")
            views.append(WorkerView(row, alive, tokens / lifetime if tokens is not None and lifetime > 0 else None))
        return views

    def cache(self, tenant: str) -> CacheView:
        stats = self.results.cache_stats(tenant)
        lookups = stats["hits"] + stats["misses"]
        return CacheView(entries=stats["entries"], bytes=self.results.cache_bytes(), hits=stats["hits"],
                         misses=stats["misses"], hit_rate=stats["hits"] / lookups if lookups else None,
                         tokens_saved=stats["prompt_tokens_saved"] + stats["completion_tokens_saved"])
