"""The migrations build exactly the schema the models describe, on a real Postgres."""

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.models import Base


def test_migrations_apply_to_an_empty_database(database_url):
    tables = set(sa.inspect(sa.create_engine(database_url, poolclass=sa.pool.NullPool)).get_table_names())
    assert {"jobs", "requests", "tasks", "results", "shards", "workers", "alembic_version"} <= tables


def test_models_match_migrations(database_url):
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_lease_token_sequence_exists(database_url):
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        first = connection.execute(sa.text("SELECT nextval('lease_token_seq')")).scalar()
        second = connection.execute(sa.text("SELECT nextval('lease_token_seq')")).scalar()
    assert second > first
