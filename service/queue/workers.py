"""Every SQL statement about worker processes (registration, heartbeat, stop, pruning) and what
their engines ran. Nothing commits."""

from __future__ import annotations

import os
import socket
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from service.models import EngineTotals, Worker

# Workers gone for a while (no heartbeat for :gone_s) are deleted, at most :limit a pass, oldest
# first (ix_workers_heartbeat_at); what their engines ran is added to their teacher's totals
# first, so the engine counters in /metrics never go down.
# The batch is chosen once (a MATERIALIZED CTE): as `id IN (SELECT ... LIMIT)` the planner may
# rescan the subquery per row, and rows tied on heartbeat_at then make each rescan pick others,
# deleting more than :limit.
PRUNE_WORKERS_SQL = sa.text(
    """
    WITH doomed AS MATERIALIZED (
        SELECT id FROM workers WHERE heartbeat_at < now() - make_interval(secs => :gone_s)
         ORDER BY heartbeat_at LIMIT :limit FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM workers w USING doomed d WHERE w.id = d.id
        RETURNING w.teacher, w.stats
    ), summed AS (
        SELECT g.teacher, jsonb_object_agg(s.name, s.total) AS stats
          FROM (SELECT g.teacher, e.key AS name, sum(CAST(e.value AS bigint)) AS total
                  FROM gone g, jsonb_each_text(g.stats) e GROUP BY g.teacher, e.key) s
          JOIN (SELECT DISTINCT teacher FROM gone) g ON g.teacher = s.teacher
         GROUP BY g.teacher
    ), added AS (
        INSERT INTO engine_totals AS t (teacher, stats) SELECT teacher, stats FROM summed
        ON CONFLICT (teacher) DO UPDATE SET stats = (
            SELECT jsonb_object_agg(k, COALESCE(CAST(t.stats ->> k AS bigint), 0)
                                       + COALESCE(CAST(excluded.stats ->> k AS bigint), 0))
              FROM jsonb_object_keys(t.stats || excluded.stats) AS k)
    )
    SELECT count(*) FROM gone
    """
)


class WorkerRepository:
    def __init__(self, session: orm.Session) -> None:
        self.session = session

    def register(self, worker_id: str, teacher: str) -> None:
        self.session.merge(Worker(id=worker_id, teacher=teacher, hostname=socket.gethostname(), pid=os.getpid(),
                                  stats={}))

    def heartbeat(self, worker_id: str, stats: dict[str, Any]) -> None:
        self.session.execute(sa.update(Worker).where(Worker.id == worker_id)
                             .values(heartbeat_at=sa.func.now(), stats=stats))

    def stopped(self, worker_id: str, stats: dict[str, Any]) -> None:
        self.session.execute(sa.update(Worker).where(Worker.id == worker_id)
                             .values(stopped_at=sa.func.now(), stats=stats))

    def prune(self, gone_s: float, limit: int) -> int:
        """Delete up to `limit` workers not seen for `gone_s` seconds, keeping what they ran."""
        return int(self.session.scalar(PRUNE_WORKERS_SQL, {"gone_s": gone_s, "limit": limit}))

    def online(self, within_s: int = 60) -> dict[str, int]:
        query = (
            sa.select(Worker.teacher, sa.func.count())
            .where(Worker.stopped_at.is_(None),
                   Worker.heartbeat_at > sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, within_s))
            .group_by(Worker.teacher)
        )
        return dict(self.session.execute(query).all())

    def engine_totals_by_teacher(self) -> dict[str, dict[str, int]]:
        """What each teacher's engines have run: the workers still listed (alive or not), plus
        the totals of those pruned (a remote engine's stats also count its HTTP traffic)."""
        totals: dict[str, dict[str, int]] = {}
        rows = [*self.session.execute(sa.select(Worker.teacher, Worker.stats)),
                *self.session.execute(sa.select(EngineTotals.teacher, EngineTotals.stats))]
        for teacher, stats in rows:
            bucket = totals.setdefault(teacher, {})
            for name, value in stats.items():
                bucket[name] = bucket.get(name, 0) + int(value)
        return totals

    def engine_totals(self) -> dict[str, int]:
        """The same, summed over teachers."""
        totals: dict[str, int] = {}
        for stats in self.engine_totals_by_teacher().values():
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + value
        return totals
