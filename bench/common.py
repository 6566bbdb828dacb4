"""Shared pieces of the benchmarks: a scratch database, the runtime, the app, results output."""

from __future__ import annotations

import json
import os
import statistics
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from service.db import normalize_url
from service.migrate import upgrade
from service.runtime import Runtime
from service.settings import PROJECT_ROOT, ServiceSettings

RESULTS = PROJECT_ROOT / "bench" / "results"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _admin(url: str, statement: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        connection.execute(sa.text(statement))


@contextmanager
def scratch_runtime(state_dir: Path, **settings):
    """A Runtime on a fresh, migrated database (dropped afterwards) and a fresh shard folder."""
    admin = normalize_url(os.environ.get("TEACHERCACHE_DATABASE_URL", DEFAULT_ADMIN_URL))
    name = f"tc_bench_{uuid.uuid4().hex[:8]}"
    _admin(admin, f'CREATE DATABASE "{name}"')
    url = sa.make_url(admin).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        rt = Runtime(ServiceSettings(database_url=url, state_dir=state_dir, models_dir=PROJECT_ROOT / "models",
                                     finalizer_poll_s=0.05, **settings), url)
        yield rt
        rt.engine.dispose()
    finally:
        _admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def as_lists(values: Any) -> Any:
    """A Sample's per-position numbers as Python lists (the vLLM adapter gives numpy arrays)."""
    return values.tolist() if hasattr(values, "tolist") else values


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """A process's resident set (VmRSS) or its peak so far (VmHWM), from /proc.

    Peaks come from VmHWM, never getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so
    a child started from a big process (pytest after the engine tests: 850 MB) reports at least
    its parent's size, whatever it used itself."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def report(title: str, rows: list[dict], filename: str, extra: dict | None = None) -> None:
    """Print a table and write the figures as JSON under bench/results/."""
    print_table(title, rows)
    write_results(filename, {"rows": rows, **(extra or {})})


def print_table(title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)


def write_results(filename: str, figures: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / filename).write_text(json.dumps(figures, indent=2, default=str) + "\n")


def timed_service_job(rt, engine, body: dict, flush_s: float = 3.0, poll_s: float = 0.2,
                      profile: Path | None = None) -> dict:
    """POST `body` -> a worker loop on `engine` -> shards assembled -> downloaded; tokens/s of it,
    and where the CPU went meanwhile (bench/cpu_profile.py; py-spy's samples in `profile`).

    The client polls every `poll_s` from this process, like a training job sharing the machine.
    """
    import io
    import threading
    import time

    import pyarrow.parquet as pq
    from fastapi.testclient import TestClient

    from bench.cpu_profile import CpuAccount
    from service.http.app import create_app
    from workers.loop import WorkerLoop
    from workers.settings import WorkerSettings

    worker = WorkerLoop(rt, engine, WorkerSettings(**{**rt.settings.model_dump(), "flush_s": flush_s}),
                        rt.teachers.get(body.get("teacher")).name)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    with TestClient(create_app(rt), headers=bench_auth(rt)) as api:
        # A deployed worker is up before a job arrives: its start (registration, the listening
        # connection, the first claim) is not the job's time. Earlier runs counted it (0.1-0.5 s).
        worker.ready.wait(60)
        with CpuAccount(rt.database_url, profile) as cpu:
            started = time.perf_counter()
            job = api.post("/v1/jobs", json=body).json()
            timeline = {"posted": time.perf_counter() - started}
            while (job := api.get(f"/v1/jobs/{job['id']}").json())["status"] != "succeeded":
                mark_timeline(timeline, job, time.perf_counter() - started)
                time.sleep(poll_s)
            timeline["succeeded seen"] = time.perf_counter() - started
            tables = [pq.read_table(io.BytesIO(api.get(s["url"]).content)) for s in job["shards"]]
            elapsed = time.perf_counter() - started
    worker.request_stop()
    thread.join(60)
    tokens = sum(len(x) for t in tables for x in t.column("completion_token_ids").to_pylist())
    timeline["downloaded"] = elapsed
    timeline.update(database_timeline(rt, job["id"]))
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed, "cpu": cpu.result(),
            "timeline": {k: round(v, 3) for k, v in timeline.items()}, "started_perf_counter": started}


def database_timeline(rt, job_id: str) -> dict[str, float]:
    """When, in seconds after the job row was written, its first and last task were indexed, it
    became ready for assembly and it ended (the database's clock, each a transaction's start)."""
    import sqlalchemy as sa

    query = sa.text("""SELECT extract(epoch FROM min(t.finished_at) - j.created_at),
                                extract(epoch FROM max(t.finished_at) - j.created_at),
                                extract(epoch FROM j.ready_at - j.created_at),
                                extract(epoch FROM j.finished_at - j.created_at)
                         FROM jobs j JOIN requests r ON r.job_id = j.id JOIN tasks t ON t.key = r.cache_key
                         WHERE j.id = :job GROUP BY j.id""")
    with rt.engine.connect() as connection:
        row = connection.execute(query, {"job": job_id}).one()
    names = ("db: first task indexed", "db: last task indexed", "db: ready", "db: ended")
    return {name: float(value) for name, value in zip(names, row, strict=True) if value is not None}


def mark_timeline(timeline: dict[str, float], job: dict, at: float) -> None:
    """The first poll that saw a request done, and the first that saw none left to compute: with
    the POST and the download they place the service's time around the engine's (to a poll)."""
    counts = job["counts"]
    if counts["completed"] + counts["failed"] > 0:
        timeline.setdefault("first request done", at)
    if counts["pending"] == 0:
        timeline.setdefault("nothing left to compute", at)


def timed_baseline(run, label: str, profile: Path | None = None) -> dict:
    """`run()` (a plain engine call returning tokens/seconds/tokens_per_s), with its CPU accounted."""
    from bench.cpu_profile import CpuAccount

    with CpuAccount(None, profile, main_thread_component=label) as cpu:
        figures = run()
    return {**figures, "cpu": cpu.result()}


def ratio_of(before: dict, service: dict, after: dict) -> float:
    return float(service["tokens_per_s"] / ((before["tokens_per_s"] + after["tokens_per_s"]) / 2))


def report_rounds(title: str, baseline: str, rounds: list[tuple[dict, dict, dict]], filename: str,
                  args: Any) -> float:
    """Each round (a baseline, the service, the baseline again) as a table with where the CPU
    went; then the median of the rounds' ratios. Writes every round to `filename`; returns the median."""
    ratios, written = [], []
    for number, (before, service, after) in enumerate(rounds, start=1):
        ratio = ratio_of(before, service, after)
        ratios.append(ratio)
        runs = [{"run": f"{baseline} (before)", **before}, {"run": "service end-to-end", **service},
                {"run": f"{baseline} (after)", **after}]
        rows = [{k: v for k, v in r.items() if k not in ("cpu", "timeline", "started_perf_counter")} for r in runs]
        cpu = {r["run"]: r["cpu"] for r in runs if "cpu" in r}
        label = f" (round {number} of {len(rounds)})" if len(rounds) > 1 else ""
        print_table(f"{title}{label} — ratio {ratio:.3f}", rows)
        if "timeline" in service:
            Console().print("service timeline, s from the POST: " +
                            ", ".join(f"{k} {v:.2f}" for k, v in service["timeline"].items()))
        for run, account in cpu.items():
            report_cpu(f"CPU during {run}: {account['cpu_s']} CPU s in {account['wall_s']} s", account)
        written.append({"ratio": ratio, "rows": rows, "cpu": cpu, "timeline": service.get("timeline")})
    median = statistics.median(ratios)
    if len(rounds) > 1:
        Console().print(f"{title}: median ratio {median:.3f} of {len(rounds)} rounds "
                        f"({', '.join(f'{r:.3f}' for r in ratios)})")
    write_results(filename, {"ratio": median, "ratios": ratios, "rounds": written, "args": vars(args)})
    return median


def report_cpu(title: str, account: dict) -> None:
    """The CPU accounting of one run as a table (and its top statements, when listed)."""
    table = Table(title=title)
    for column in ("component", "cpu_s", "share"):
        table.add_column(column)
    for row in account["components"]:
        table.add_row(row["component"], f"{row['cpu_s']:.2f}", f"{row['share']:.1%}")
    Console().print(table)
    if account.get("statements"):
        statements = Table(title="Postgres statements (pg_stat_statements), by total time")
        for column in ("calls", "ms", "query"):
            statements.add_column(column)
        for row in account["statements"]:
            statements.add_row(str(row.get("calls", "")), str(row.get("ms", "")), row["query"])
        Console().print(statements)


def bench_key(rt) -> str:
    """A fresh key of the tenant `bench` in the scratch database."""
    from service.tenants.service import TenantService

    with rt.sessions() as db, db.begin():
        return TenantService(db).create_key("bench", label="benchmarks")[1]


def bench_auth(rt) -> dict[str, str]:
    return {"Authorization": f"Bearer {bench_key(rt)}"}
