"""Tables for tenants and API keys.

A key is shown once, when it is created, and stored only as the SHA-256 of its secret: keys
are 256-bit random strings, so a fast hash is as safe as a slow one and keeps every request's
check to one indexed lookup plus one constant-time comparison.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import JSONB

from service.models import NOW, TIMESTAMP, Base


class Tenant(Base):
    __tablename__ = "tenants"

    name: orm.Mapped[str] = orm.mapped_column(sa.String(64), primary_key=True)
    created_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW)
    # The tenant's own values of the submission limits ({name: value}); the settings elsewhere.
    limits: orm.Mapped[dict[str, Any]] = orm.mapped_column(JSONB, server_default=sa.text("'{}'::jsonb"))
    # The submission rate limit's token bucket, kept here so every API replica shares it.
    rate_tokens: orm.Mapped[float | None] = orm.mapped_column(sa.Float)
    rate_updated_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)


class ApiKey(Base):
    __tablename__ = "api_keys"

    # Public part of the key (`tck_<id>_<secret>`): finds the row without comparing secrets in SQL.
    id: orm.Mapped[str] = orm.mapped_column(sa.String(32), primary_key=True)
    tenant: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("tenants.name", ondelete="CASCADE"), index=True)
    secret_sha256: orm.Mapped[str] = orm.mapped_column(sa.String(64))
    label: orm.Mapped[str | None] = orm.mapped_column(sa.String(200))
    created_at: orm.Mapped[datetime] = orm.mapped_column(TIMESTAMP, server_default=NOW)
    revoked_at: orm.Mapped[datetime | None] = orm.mapped_column(TIMESTAMP)
