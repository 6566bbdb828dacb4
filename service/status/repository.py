"""Every SQL statement the status page needs beyond the jobs and cache domains. Nothing commits.

Each query is bounded by what is live (active jobs, leased tasks, recent workers) or by one
job's snapshots, never by the size of the requests or results tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql

from service.models import JobProgress, Task, Worker

# Progress snapshots of one job drawn at most: older points are thinned evenly.
MAX_POINTS = 240


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

    def last_snapshot_at(self, job_id: str) -> datetime | None:
        return self.session.scalar(sa.select(sa.func.max(JobProgress.at)).where(JobProgress.job_id == job_id))

    def add_snapshot(self, job_id: str, completed: int, cached: int, failed: int) -> None:
        row = {"job_id": job_id, "completed": completed, "cached": cached, "failed": failed}
        # Two finalizers (API and a worker) may snapshot in the same instant: one row is enough.
        self.session.execute(postgresql.insert(JobProgress).values(**row).on_conflict_do_nothing())

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
            .where(Task.state == "leased", Task.lease_owner.in_(worker_ids))
            .group_by(Task.lease_owner)
        )
        return dict(self.session.execute(query).all())
