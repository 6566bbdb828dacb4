"""API keys: created (shown once), checked on every request, revoked. Services never commit.

A key reads `tck_<id>_<secret>`. The id finds the row; the secret is compared, as SHA-256
digests, in constant time. Nothing but the digest is stored, and nothing logs a key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import orm

from service.errors import NotFound, RateLimited, ValidationFailed
from service.jobs.limits import JobLimits, check_limit_name, check_limit_value
from service.tenants.models import ApiKey, Tenant
from service.tenants.repository import TenantRepository

KEY_PATTERN = re.compile(r"^tck_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Compared against when the key id is unknown, so a miss costs what a hit costs.
UNKNOWN_KEY_DIGEST = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant every query of the request is scoped to, and its own limits."""

    tenant: str
    key_id: str
    limits: dict[str, Any] = field(default_factory=dict)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, secret): 64 bits of id, 256 bits of secret."""
    return secrets.token_hex(8), secrets.token_urlsafe(32)


def check_tenant_name(name: str) -> None:
    if not TENANT_NAME.match(name):
        raise ValidationFailed(
            f"tenant: {name!r} is not a tenant name (lowercase letters, digits, '.', '_', '-'; at most 64)",
            field="tenant",
        )


class TenantService:
    def __init__(self, session: orm.Session) -> None:
        self.repo = TenantRepository(session)

    def create_key(self, tenant: str, label: str | None = None) -> tuple[ApiKey, str]:
        """A new key for `tenant` (created if new); the plaintext is returned once, never stored."""
        check_tenant_name(tenant)
        if self.repo.tenant(tenant) is None:
            self.repo.add(Tenant(name=tenant))
        key_id, secret = new_key()
        row = ApiKey(id=key_id, tenant=tenant, secret_sha256=digest(secret), label=label)
        self.repo.add(row)
        return row, f"tck_{key_id}_{secret}"

    def revoke(self, key_id: str) -> None:
        if not self.repo.revoke(key_id):
            raise NotFound(f"no active key {key_id!r}", field="key_id")

    def set_limit(self, tenant: str, name: str, value: float | None) -> dict[str, Any]:
        """Give the tenant its own value of a limit (None: back to the service's); its limits now."""
        row = self.repo.tenant(tenant)
        if row is None:
            raise NotFound(f"no tenant {tenant!r}", field="tenant")
        check_limit_name(name)
        limits = {k: v for k, v in row.limits.items() if k != name}
        if value is not None:
            limits[name] = check_limit_value(name, value)
        row.limits = limits
        return limits

    def tenants(self) -> list[Tenant]:
        return self.repo.tenants()

    def spend_submission(self, tenant: str, limits: JobLimits) -> None:
        """Take one submission from the tenant's bucket, or refuse with 429 and when to retry."""
        per_minute, burst = limits.submissions_per_minute, limits.submission_burst
        rate = per_minute / 60.0
        tokens = self.repo.take_submission_token(tenant, rate, burst)
        if tokens < 1:
            raise RateLimited(
                f"tenant {tenant!r} submits too often (limit submissions_per_minute = {per_minute:g}, "
                f"burst {burst})", limit="submissions_per_minute", maximum=per_minute,
                retry_after_s=(1 - tokens) / rate,
            )

    def authenticate(self, token: str) -> Caller | None:
        """The caller a presented key stands for, or None (unknown, malformed or revoked)."""
        match = KEY_PATTERN.match(token)
        key_id, secret = match.groups() if match else ("", "")
        found = self.repo.key_with_limits(key_id) if key_id else None
        row, limits = found if found else (None, {})
        expected = row.secret_sha256 if row is not None else UNKNOWN_KEY_DIGEST
        matches = hmac.compare_digest(digest(secret), expected)
        if row is None or not matches or row.revoked_at is not None:
            return None
        return Caller(tenant=row.tenant, key_id=row.id, limits=limits)
