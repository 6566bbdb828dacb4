"""The one statement the synchronous endpoints add: how many requests of some jobs still wait."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import orm

from service.models import Job


class OnlineRepository:
    def __init__(self, session: orm.Session) -> None:
        self.session = session

    def pending(self, job_ids: list[str]) -> int:
        """The jobs' maintained pending counters, summed (a primary-key read per job)."""
        total = self.session.scalar(sa.select(sa.func.coalesce(sa.func.sum(Job.n_pending), 0))
                                    .where(Job.id.in_(job_ids)))
        return int(total or 0)
