"""Request-scoped dependencies: the runtime, and a session whose transaction the handler owns."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy import orm

from service.runtime import Runtime


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def session(request: Request) -> Iterator[orm.Session]:
    """One transaction per request: committed when the handler returns, rolled back on error."""
    with runtime(request).sessions() as db, db.begin():
        yield db


def shard_url_builder(request: Request):
    base = runtime(request).settings.public_url or str(request.base_url).rstrip("/")
    return lambda shard_id: f"{base}/v1/shards/{shard_id}"
