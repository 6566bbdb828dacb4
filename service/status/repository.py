"""Every SQL statement the status page needs beyond the jobs and cache domains. Nothing commits.

Each query is bounded by what is live (active jobs, leased tasks, recent workers) or by one
job's snapshots, never by the size of the requests or results tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from service.models import JobProgress, Task, Worker
from service.states import JOB_ACTIVE, TaskState, sql_list

# Progress snapshots of one job drawn at most: older points are thinned evenly.
MAX_POINTS = 240
# Each running job's counters (maintained on its row), at most one row per job every :every_s.
# Two finalizers (the API's and a worker's) may snapshot in the same instant: one row is enough.
SNAPSHOT_SQL = sa.text(
    f"""
    INSERT INTO job_progress (job_id, completed, cached, failed)
    SELECT j.id, j.n_completed, j.n_cached, j.n_failed FROM jobs j
     WHERE j.status IN ({sql_list(JOB_ACTIVE)})
       AND NOT EXISTS (SELECT 1 FROM job_progress p WHERE p.job_id = j.id
                        AND p.at > now() - make_interval(secs => :every_s))
    ON CONFLICT DO NOTHING
    """
)


@dataclass(frozen=True)
class ProgressPoint:
    at: datetime
    completed: int
    cached: int
    failed: int


@dataclass(frozen=True)
class WorkerRow:
    id: str
    teacher: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    stats: dict[str, int]
    leases: int


class StatusRepository:
    def __init__(self, session: orm.Session) -> None:
        self.session = session

    def snapshot_active_jobs(self, every_s: float) -> int:
        """A snapshot of each active job's counters whose last one is older than `every_s`; how
        many were written (bounded by the active jobs, never by their requests)."""
        written: sa.CursorResult[Any] = self.session.execute(SNAPSHOT_SQL, {"every_s": every_s})  # type: ignore[assignment]
        return int(written.rowcount)

    def progress(self, job_id: str) -> list[ProgressPoint]:
        """The job's snapshots, oldest first, thinned to at most MAX_POINTS (the last one kept)."""
        numbered = (
            sa.select(JobProgress, sa.func.row_number().over(order_by=JobProgress.at.desc()).label("n"),
                      sa.func.count().over().label("total"))
            .where(JobProgress.job_id == job_id)
            .subquery()
        )
        stride = sa.func.greatest(1, sa.func.ceil(numbered.c.total / float(MAX_POINTS)))
        query = (
            sa.select(numbered.c.at, numbered.c.completed, numbered.c.cached, numbered.c.failed)
            .where((numbered.c.n - 1) % sa.cast(stride, sa.Integer) == 0)
            .order_by(numbered.c.at)
        )
        return [ProgressPoint(*row) for row in self.session.execute(query)]

    def workers(self, seen_within_s: int, limit: int) -> list[WorkerRow]:
        """Workers seen lately, newest heartbeat first, with the leases each holds now."""
        recent = sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, seen_within_s)
        found = self.session.scalars(
            sa.select(Worker).where(Worker.heartbeat_at > recent).order_by(Worker.heartbeat_at.desc()).limit(limit)
        ).all()
        leases = self.leases_held([w.id for w in found])
        return [WorkerRow(w.id, w.teacher, w.hostname, w.pid, w.started_at, w.heartbeat_at, w.stopped_at,
                          {k: int(v) for k, v in (w.stats or {}).items()}, leases.get(w.id, 0)) for w in found]

    def leases_held(self, worker_ids: list[str]) -> dict[str, int]:
        if not worker_ids:
            return {}
        query = (
            sa.select(Task.lease_owner, sa.func.count())
            .where(Task.state == TaskState.LEASED, Task.lease_owner.in_(worker_ids))
            .group_by(Task.lease_owner)
        )
        return {owner: int(n) for owner, n in self.session.execute(query).all() if owner is not None}
