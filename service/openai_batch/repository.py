"""Every SQL statement about OpenAI-compatible files and batches. Nothing here commits."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from service.openai_batch.models import OpenAIBatch, OpenAIFile


class OpenAIBatchRepository:
    def __init__(self, session: orm.Session) -> None:
        self.session = session

    def add(self, row: OpenAIFile | OpenAIBatch) -> None:
        self.session.add(row)
        self.session.flush()

    def file(self, file_id: str, tenant: str) -> OpenAIFile | None:
        query = sa.select(OpenAIFile).where(OpenAIFile.id == file_id, OpenAIFile.tenant == tenant)
        return self.session.scalar(query)

    def batch(self, batch_id: str, tenant: str, lock: bool = False) -> OpenAIBatch | None:
        query = sa.select(OpenAIBatch).where(OpenAIBatch.id == batch_id, OpenAIBatch.tenant == tenant)
        return self.session.scalar(query.with_for_update() if lock else query)

    def list_batches(self, tenant: str, limit: int, before: tuple[Any, str] | None) -> list[OpenAIBatch]:
        query = (
            sa.select(OpenAIBatch)
            .where(OpenAIBatch.tenant == tenant)
            .order_by(OpenAIBatch.created_at.desc(), OpenAIBatch.id.desc())
            .limit(limit)
        )
        if before is not None:
            query = query.where(sa.tuple_(OpenAIBatch.created_at, OpenAIBatch.id) < sa.tuple_(*before))
        return list(self.session.scalars(query))
