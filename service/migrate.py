"""Apply the Alembic migrations under `migrations/` to a database.

Every API replica and worker migrates on start. Concurrent starts on one database are
serialized by a Postgres advisory lock (session-level, on the migrating connection): the
first applies the migrations, the others wait, then find nothing left to do. Without it two
processes could both create the same table or both insert into alembic_version, and crash.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from service.db import is_transient, normalize_url
from service.settings import PROJECT_ROOT

log = logging.getLogger(__name__)

MIGRATION_LOCK = sa.text("SELECT pg_advisory_lock(hashtextextended('teachercache:migrations', 0))")
MIGRATION_UNLOCK = sa.text("SELECT pg_advisory_unlock(hashtextextended('teachercache:migrations', 0))")


def alembic_config(url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    engine = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(MIGRATION_LOCK)
            connection.commit()
            try:
                config = alembic_config(url)
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                connection.commit()
            finally:
                connection.rollback()
                connection.execute(MIGRATION_UNLOCK)
                connection.commit()
    finally:
        engine.dispose()


def upgrade_on_start(url: str, wait_s: float) -> None:
    """Migrate as a long-running process starts, waiting up to `wait_s` for a database that is
    restarting or not up yet. Without the wait, a worker started during an outage exits and its
    queue waits for a supervisor to restart it; with it, the worker serves once Postgres is back."""
    retrying = Retrying(retry=retry_if_exception(is_transient), stop=stop_after_delay(wait_s),
                        wait=wait_exponential_jitter(multiplier=0.2, max=5.0), reraise=True,
                        before_sleep=_log_unreachable)
    retrying(upgrade, url)


def _log_unreachable(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    first_line = str(error).strip().splitlines()[0] if error and str(error).strip() else type(error).__name__
    log.warning("the database is unreachable (%s); retrying for up to the start-up wait", first_line)
