"""Tables for the OpenAI-compatible layer: uploaded/produced JSONL files and batches.

A batch owns at most one native job (NULL while validation fails); everything about the
teacher work lives in that job, so a batch only records what OpenAI's object needs on top.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import JSONB

from service.models import NOW, TIMESTAMP, Base
from service.states import BatchStatus, check_in


class OpenAIFile(Base):
    """A JSONL file in storage under `files/`: an uploaded batch input, or a batch's output/error file."""

    __tablename__ = "files"
    __table_args__ = (
        sa.Index("ix_files_tenant_created_at", "tenant", "created_at"),
        # The retention sweep: files past their expiry, oldest first, without looking at the rest.
        sa.Index("ix_files_expires_at", "expires_at", postgresql_where=sa.text("expires_at IS NOT NULL")),
    )

    id: orm.Mapped[str] = orm.mapped_column(sa.String(40), primary_key=True)
    tenant: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("tenants.name"), index=True)
    purpose: orm.Mapped[str] = orm.mapped_column(sa.String(32))
    filename: orm.Mapped[str] = orm.mapped_column(sa.String(500))
    bytes: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    path: orm.Mapped[str] = orm.mapped_column(sa.String(500))  # relative to the storage root
    # The content's digest: a job from this file is fingerprinted by it (None: uploaded before migration 0012).
    sha256: orm.Mapped[str | None] = orm.mapped_column(sa.String(64))
    created_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW)
    # A batch's output/error file under the batch's output_expires_after; NULL: kept until deleted.
    expires_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)


class OpenAIBatch(Base):
    __tablename__ = "batches"
    __table_args__ = (sa.Index("ix_batches_tenant_created_at", "tenant", "created_at"), check_in("status", BatchStatus))

    id: orm.Mapped[str] = orm.mapped_column(sa.String(40), primary_key=True)
    tenant: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("tenants.name"))
    # No foreign key: the input file may be deleted (as OpenAI allows) and the batch keeps its id.
    input_file_id: orm.Mapped[str] = orm.mapped_column(sa.String(40))
    endpoint: orm.Mapped[str] = orm.mapped_column(sa.String(64))
    completion_window: orm.Mapped[str] = orm.mapped_column(sa.String(16))
    status: orm.Mapped[str] = orm.mapped_column(sa.String(16))  # BatchStatus
    job_id: orm.Mapped[str | None] = orm.mapped_column(sa.ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    errors: orm.Mapped[list[Any] | None] = orm.mapped_column(JSONB)
    output_file_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(40))
    error_file_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(40))
    metadata_: orm.Mapped[dict[str, Any]] = orm.mapped_column("metadata", JSONB)
    model: orm.Mapped[str | None] = orm.mapped_column(sa.String(200))  # the lines' model (the teacher)
    # OpenAI's usage object, summed over the output file's lines when they are written.
    usage: orm.Mapped[dict[str, Any] | None] = orm.mapped_column(JSONB)
    # output_expires_after.seconds: the output and error files expire this long after they are written.
    output_expires_after_s: orm.Mapped[int | None] = orm.mapped_column(sa.Integer)
    request_total: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    request_completed: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    request_failed: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    created_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW, index=True)
    in_progress_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    finalizing_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    completed_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    failed_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    cancelling_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    cancelled_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
    # Set when the completion window ran out: its job is cancelled and the batch ends `expired`.
    expired_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
