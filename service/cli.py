"""Server-side commands, added to the `teachercache` CLI through the `teachercache.cli` entry point."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from service.settings import ServiceSettings

if TYPE_CHECKING:  # imported where used: the CLI starts without the server's modules
    from service.runtime import Runtime

teacher_app = typer.Typer(help="Teachers: prepare model folders, list the registry.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants and their own limits.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(teacher_app, name="teacher")
    app.add_typer(db_app, name="db")
    app.add_typer(keys_app, name="keys")
    app.add_typer(tenants_app, name="tenants")
    app.command("serve", help="Run the HTTP API.")(serve)
    app.command("up", help="Run the whole stack on this machine: database, API and one worker.")(up)


@teacher_app.command("prepare")
def teacher_prepare(name: Annotated[str | None, typer.Argument(help="default: every built-in teacher")] = None) -> None:
    """Convert a teacher's weights into a local model folder, once."""
    from service.teachers.prepare import prepare_teacher
    from service.teachers.registry import load_registry

    settings = ServiceSettings()
    registry = load_registry(settings.teachers_file)
    names = [name] if name else [n for n, t in registry.teachers.items() if t.source]
    for teacher in names:
        folder, built = prepare_teacher(registry.get(teacher), settings.models_dir)
        typer.echo(f"{teacher}: {'prepared' if built else 'already prepared'} at {folder}")


@teacher_app.command("list")
def teacher_list() -> None:
    from service.teachers.catalog import TeacherCatalog

    for teacher in TeacherCatalog.from_settings(ServiceSettings()).available():
        typer.echo(f"{teacher.name}\t{teacher.revision}\t{teacher.folder}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration to the configured database (or the embedded server)."""
    from service.db import resolve_database_url
    from service.migrate import upgrade as run_upgrade

    run_upgrade(resolve_database_url(ServiceSettings()))
    typer.echo("database is at the latest schema")


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="the tenant the key acts for (created if new)")],
                label: Annotated[str | None, typer.Option(help="a note: who or what uses the key")] = None) -> None:
    """Create a key and print it; it is stored only as a hash and cannot be shown again."""
    from service.tenants.service import TenantService

    with refusals_reported(), admin_runtime().sessions() as db, db.begin():
        row, key = TenantService(db).create_key(tenant, label)
    typer.echo(f"created key {row.id} for tenant {tenant!r}; it is shown once:", err=True)
    typer.echo(key)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option()] = None) -> None:
    """Key ids, tenants, labels and state (never the keys)."""
    from service.tenants.repository import TenantRepository

    with admin_runtime().sessions() as db:
        for row in TenantRepository(db).keys(tenant):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            typer.echo(f"{row.id}\t{row.tenant}\t{state}\t{row.created_at:%Y-%m-%d %H:%M}\t{row.label or ''}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the id shown by `keys list` (tck_<id>_...)")]) -> None:
    """Revoke a key: the next request that presents it gets 401."""
    from service.tenants.service import TenantService

    with refusals_reported(), admin_runtime().sessions() as db, db.begin():
        TenantService(db).revoke(key_id)
    typer.echo(f"revoked key {key_id}")


@tenants_app.command("list")
def tenants_list() -> None:
    """Tenants and the limits they have of their own (the service's settings apply to the rest)."""
    from service.tenants.service import TenantService

    with admin_runtime().sessions() as db:
        for tenant in TenantService(db).tenants():
            own = ", ".join(f"{k}={v}" for k, v in sorted(tenant.limits.items())) or "service limits"
            typer.echo(f"{tenant.name}\t{tenant.created_at:%Y-%m-%d %H:%M}\t{own}")


@tenants_app.command("set-limit")
def tenants_set_limit(
    tenant: Annotated[str, typer.Argument()],
    limit: Annotated[str, typer.Argument(help="e.g. max_pending_requests_per_tenant, submissions_per_minute")],
    value: Annotated[float | None, typer.Argument(help="omit to go back to the service's setting")] = None,
) -> None:
    """Give a tenant its own value of a submission limit; it applies from its next request."""
    from service.tenants.service import TenantService

    with refusals_reported(), admin_runtime().sessions() as db, db.begin():
        limits = TenantService(db).set_limit(tenant, limit, value)
    typer.echo(f"{tenant}: {limits or 'service limits'}")


@contextmanager
def refusals_reported() -> Iterator[None]:
    """An admin command the service refuses: its message on stderr and exit code 2, no traceback."""
    from service.errors import TeachercacheError

    try:
        yield
    except TeachercacheError as exc:
        typer.echo(exc.message, err=True)
        raise typer.Exit(2) from exc


def admin_runtime() -> Runtime:
    """The configured database (or the embedded server), migrated."""
    from service.migrate import upgrade as run_upgrade
    from service.runtime import Runtime

    rt = Runtime.from_settings(ServiceSettings())
    run_upgrade(rt.database_url)
    return rt


def serve(host: Annotated[str | None, typer.Option()] = None, port: Annotated[int | None, typer.Option()] = None) -> None:
    settings = ServiceSettings()
    run_api(settings, host, port, embedded=settings.database_url is None)


def run_api(settings: ServiceSettings, host: str | None, port: int | None, embedded: bool) -> None:
    import uvicorn

    from service.http.app import create_app
    from service.migrate import upgrade_on_start
    from service.runtime import Runtime

    logging.basicConfig(level=logging.INFO)
    rt = Runtime.from_settings(settings)
    upgrade_on_start(rt.database_url, settings.db_startup_wait_s)
    if embedded:
        announce_local_key(rt)
    uvicorn.run(create_app(rt), host=host or settings.host, port=port or settings.port, log_level="warning")


def announce_local_key(rt: Runtime) -> None:
    """The embedded stack needs no set-up: a key for tenant `local` waits in the state folder."""
    from service.tenants.local_key import ensure_local_key

    path, created = ensure_local_key(rt)
    typer.echo(f"API key for tenant 'local' {'created' if created else 'is'} in {path}  "
               "(clients on this machine read it from there)")


def up(teacher: Annotated[str | None, typer.Option(help="teacher for the worker")] = None,
       port: Annotated[int | None, typer.Option()] = None,
       log_dir: Annotated[Path | None, typer.Option(help="write the API's and the worker's logs to "
                                                            "api.log and worker.log here, not the terminal")] = None,
       ) -> None:
    """Embedded stack in the foreground: Postgres (embedded unless configured), API, one worker."""
    from service.db import resolve_database_url

    settings = ServiceSettings()
    if log_dir is not None:
        log_to_file(log_dir / "api.log")
    teacher_prepare(None)
    url = resolve_database_url(settings, own_embedded=True)  # embedded unless configured; stopped at exit
    env = {**os.environ, "TEACHERCACHE_DATABASE_URL": url}
    command = [sys.executable, "-m", "workers", *(["--teacher", teacher] if teacher else [])]
    supervisor = WorkerSupervisor(command, env, log_file=None if log_dir is None else log_dir / "worker.log")
    port = port or settings.port
    typer.echo(f"teachercache is up: http://{settings.host}:{port}  (one worker; Ctrl-C stops)")
    try:
        run_api(settings.model_copy(update={"database_url": url}), None, port,
                embedded=settings.database_url is None)
    finally:
        supervisor.stop()


def log_to_file(path: Path) -> None:
    """Everything this process logs, and whatever its libraries print on stderr, into `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = path.open("a", buffering=1)
    os.dup2(stream.fileno(), sys.stderr.fileno())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class WorkerSupervisor:
    """Runs the worker process; restarts it when it exits non-zero (its engine died), a few times."""

    def __init__(self, command: list[str], env: dict[str, str], max_restarts: int = 3,
                 log_file: Path | None = None) -> None:
        self.command, self.env, self.max_restarts = command, env, max_restarts
        self.log_file = log_file
        self.stopping = threading.Event()
        self.process = self._start()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        for restart in range(self.max_restarts + 1):
            code = self.process.wait()
            if self.stopping.is_set() or code == 0:
                return
            if restart == self.max_restarts:
                break
            logging.warning("worker exited with %s; restarting it", code)
            time.sleep(2 ** restart)
            self.process = self._start()
        logging.error("the worker keeps failing; stopping the stack")
        os.kill(os.getpid(), signal.SIGINT)

    def _start(self) -> subprocess.Popen[bytes]:
        if self.log_file is None:
            return subprocess.Popen(self.command, env=self.env)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.stopping.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
