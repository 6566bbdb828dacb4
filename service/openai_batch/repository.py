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

    def list_files(self, tenant: str, limit: int, before: tuple[Any, str] | None, purpose: str | None,
                   ascending: bool) -> list[OpenAIFile]:
        """A page of the tenant's files by creation (keyset on (created_at, id): one index range scan)."""
        order = (OpenAIFile.created_at.asc(), OpenAIFile.id.asc()) if ascending else \
            (OpenAIFile.created_at.desc(), OpenAIFile.id.desc())
        query = sa.select(OpenAIFile).where(OpenAIFile.tenant == tenant).order_by(*order).limit(limit)
        if purpose is not None:
            query = query.where(OpenAIFile.purpose == purpose)
        if before is not None:
            cursor = sa.tuple_(OpenAIFile.created_at, OpenAIFile.id)
            query = query.where(cursor > sa.tuple_(*before) if ascending else cursor < sa.tuple_(*before))
        return list(self.session.scalars(query))

    def delete_file(self, row: OpenAIFile) -> None:
        self.session.delete(row)
        self.session.flush()

    def delete_expired_files(self, limit: int) -> list[str]:
        """Remove up to `limit` files past their expires_at (oldest first, by the partial index;
        locked rows are another sweeper's); the storage paths, to remove once this commits."""
        expired = (sa.select(OpenAIFile.id).where(OpenAIFile.expires_at < sa.func.now())
                   .order_by(OpenAIFile.expires_at).limit(limit).with_for_update(skip_locked=True))
        deleted = sa.delete(OpenAIFile).where(OpenAIFile.id.in_(expired.scalar_subquery())).returning(OpenAIFile.path)
        return list(self.session.scalars(deleted))

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
