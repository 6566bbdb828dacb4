"""Every SQL statement about worker processes (registration, heartbeat, stop). Nothing commits."""

from __future__ import annotations

import os
import socket
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from service.models import Worker


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
