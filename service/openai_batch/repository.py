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

    def file(self, file_id: str) -> OpenAIFile | None:
        return self.session.get(OpenAIFile, file_id)

    def batch(self, batch_id: str, lock: bool = False) -> OpenAIBatch | None:
        return self.session.get(OpenAIBatch, batch_id, with_for_update=lock)

    def refresh(self, batch: OpenAIBatch) -> None:
        """Reload server-set columns (created_at) after an insert."""
        self.session.refresh(batch)

    def list_batches(self, limit: int, before: tuple[Any, str] | None) -> list[OpenAIBatch]:
        query = sa.select(OpenAIBatch).order_by(OpenAIBatch.created_at.desc(), OpenAIBatch.id.desc()).limit(limit)
        if before is not None:
            query = query.where(sa.tuple_(OpenAIBatch.created_at, OpenAIBatch.id) < sa.tuple_(*before))
        return list(self.session.scalars(query))
