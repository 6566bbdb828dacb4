"""The migrations build exactly the schema the models describe, on a real Postgres."""

import re

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.models import Base
from service.states import BatchStatus, JobStatus, RequestState, TaskState


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


STATE_COLUMNS = {("jobs", "status"): JobStatus, ("requests", "state"): RequestState,
                 ("tasks", "state"): TaskState, ("batches", "status"): BatchStatus}


def test_state_columns_allow_exactly_the_enum_values(database_url):
    """The migrations' CHECK constraints hold the values service/states.py defines, no more, no fewer."""
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        for (table, column), enum in STATE_COLUMNS.items():
            definition = connection.execute(
                sa.text("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = :name"),
                {"name": f"ck_{table}_{column}"},
            ).scalar_one()
            assert set(re.findall(r"'([a-z_]+)'", definition)) == {state.value for state in enum}, table


def test_an_unknown_state_is_refused(database_url):
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection, pytest.raises(sa.exc.IntegrityError, match="ck_tasks_state"):
        connection.execute(sa.text(
            "INSERT INTO tasks (key, teacher, state, mode, prompt_token_ids, sampling, top_logprobs)"
            " VALUES ('k', 't', 'runing', 'generate', '{1}', '{}', 0)"))


def test_openapi_lists_the_states(api):
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["JobStatus"]["enum"] == [state.value for state in JobStatus]
    assert schemas["BatchStatus"]["enum"] == [state.value for state in BatchStatus]
    assert schemas["JobOut"]["properties"]["status"] == {"$ref": "#/components/schemas/JobStatus"}
    assert schemas["BatchObject"]["properties"]["status"] == {"$ref": "#/components/schemas/BatchStatus"}
