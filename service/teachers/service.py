"""What GET /v1/teachers answers: the teachers some worker can serve, with how many serve each."""

from __future__ import annotations

from typing import Any

from sqlalchemy import orm

from service.queue.workers import WorkerRepository
from service.teachers.catalog import TeacherCatalog


def available_teachers(catalog: TeacherCatalog, session: orm.Session) -> list[dict[str, Any]]:
    online = WorkerRepository(session).online()
    return [{**teacher.describe(), "workers": online.get(teacher.name, 0)} for teacher in catalog.available()]
