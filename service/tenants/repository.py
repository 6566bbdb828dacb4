"""Every SQL statement about tenants and API keys. Nothing here commits."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from service.tenants.models import ApiKey, Tenant

# The submission rate limit: a token bucket per tenant, refilled at `rate` per second up to
# `burst`, read and spent in one statement under the row lock so API replicas share it.
# Returns the tokens there were before this submission; below 1 means it was refused.
TAKE_SUBMISSION_TOKEN_SQL = sa.text(
    """
    WITH clock AS (SELECT clock_timestamp() AS now),  -- read once: two reads would differ
    bucket AS (
        SELECT name, clock.now,
               LEAST(CAST(:burst AS float8), COALESCE(rate_tokens, :burst)
                     + EXTRACT(EPOCH FROM clock.now - COALESCE(rate_updated_at, clock.now))
                     * CAST(:rate AS float8)) AS tokens
          FROM tenants, clock WHERE name = :tenant FOR UPDATE OF tenants
    )
    UPDATE tenants t
       SET rate_tokens = CASE WHEN b.tokens >= 1 THEN b.tokens - 1 ELSE b.tokens END,
           rate_updated_at = b.now
      FROM bucket b
     WHERE t.name = b.name
    RETURNING b.tokens
    """
)


class TenantRepository:
    def __init__(self, session: orm.Session) -> None:
        self.session = session

    def tenant(self, name: str) -> Tenant | None:
        return self.session.get(Tenant, name)

    def add(self, row: Tenant | ApiKey) -> None:
        self.session.add(row)
        self.session.flush()

    def key_with_limits(self, key_id: str) -> tuple[ApiKey, dict[str, Any]] | None:
        """The key and its tenant's own limits, in one query (every request asks)."""
        query = sa.select(ApiKey, Tenant.limits).join(Tenant, Tenant.name == ApiKey.tenant).where(ApiKey.id == key_id)
        row = self.session.execute(query).one_or_none()
        return (row[0], row[1]) if row else None

    def keys(self, tenant: str | None = None) -> list[ApiKey]:
        query = sa.select(ApiKey).order_by(ApiKey.tenant, ApiKey.created_at)
        if tenant is not None:
            query = query.where(ApiKey.tenant == tenant)
        return list(self.session.scalars(query))

    def tenants(self) -> list[Tenant]:
        return list(self.session.scalars(sa.select(Tenant).order_by(Tenant.name)))

    def revoke(self, key_id: str) -> bool:
        statement = (
            sa.update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=sa.func.now())
        )
        result: sa.CursorResult[Any] = self.session.execute(statement)  # type: ignore[assignment]  # an UPDATE's
        return result.rowcount == 1

    def take_submission_token(self, tenant: str, rate_per_s: float, burst: float) -> float:
        params = {"tenant": tenant, "rate": rate_per_s, "burst": burst}
        return float(self.session.execute(TAKE_SUBMISSION_TOKEN_SQL, params).scalar_one())
