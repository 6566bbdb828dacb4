"""Concurrent starts migrate one database without crashing: an advisory lock serializes them."""

from __future__ import annotations

import concurrent.futures
import uuid

import sqlalchemy as sa

from service.migrate import upgrade
from tests.integration.conftest import run_admin, with_database


def test_concurrent_migrations_of_a_fresh_database_all_succeed(postgres_admin_url):
    name = f"tc_migrate_{uuid.uuid4().hex[:8]}"
    run_admin(postgres_admin_url, f'CREATE DATABASE "{name}"')
    url = with_database(postgres_admin_url, name)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for future in [pool.submit(upgrade, url) for _ in range(4)]:
                future.result(timeout=60)  # raises if any start crashed (unlocked, they deadlocked)
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            versions = connection.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar()
        engine.dispose()
        assert versions == 1
    finally:
        run_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
