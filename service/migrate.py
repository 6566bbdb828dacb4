"""Apply the Alembic migrations under `migrations/` to a database.

Every API replica and worker migrates on start. Concurrent starts on one database are
serialized by a Postgres advisory lock (session-level, on the migrating connection): the
first applies the migrations, the others wait, then find nothing left to do. Without it two
processes could both create the same table or both insert into alembic_version, and crash.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from service.db import normalize_url
from service.settings import PROJECT_ROOT

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
