"""Alembic environment: migrates the database the service settings point at."""

import sqlalchemy as sa
from alembic import context

from service.db import normalize_url, resolve_database_url
from service.models import Base
from service.settings import ServiceSettings

target_metadata = Base.metadata


def database_url() -> str:
    configured = context.config.attributes.get("url") or context.config.get_main_option("sqlalchemy.url")
    return configured or resolve_database_url(ServiceSettings())


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # NullPool: no connection outlives the migration (tests clone the migrated database).
    engine = sa.create_engine(normalize_url(database_url()), poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
        connection.commit()


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
