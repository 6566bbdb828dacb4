"""The status page at scale: its pages with 10^6 jobs in the table against the same with 10^3.

    .venv/bin/python -m bench.bench_status_page [--jobs 1000000] [--small 1000]

Two scratch databases are filled in SQL (generate_series): `--small` and `--jobs` jobs of one
tenant (a tenth running, the rest finished, spread over the statuses), each with its maintained
counters, and a running job with 200 progress snapshots; then VACUUM ANALYZE. On each, after a
warm-up round: `GET /ui/jobs` (the first page), `GET /ui/jobs?status=failed`, a deep page
(`after` a job half-way down), `GET /ui/jobs/{id}` of the running job, and its refreshed part
(`/live`): p50 of 20 requests each, and the ratio large/small (1.0: no growth with the table).

Writes bench/results/status_page_<jobs>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bench.common import report, scratch_runtime

TEACHER = "smollm2-135m-instruct"
RUNNING = "job_" + "5ca1e" * 6 + "51"
FILL_SQL = [
    "INSERT INTO tenants (name) VALUES ('bench') ON CONFLICT DO NOTHING",
    """INSERT INTO jobs (id, tenant, status, teacher, mode, top_logprobs, sampling, cache_policy, metadata, total,
                         body_sha256, n_pending, n_completed, n_failed, created_at, started_at, finished_at)
       SELECT 'job_' || lpad(to_hex(i), 32, '0'), 'bench',
              (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'cancelled', 'succeeded', 'succeeded',
                     'succeeded', 'succeeded', 'running'])[1 + i % 10],
              :teacher, 'generate', 5, '{}', 'use', '{}', 100, repeat('0', 64),
              CASE WHEN i % 10 = 9 THEN 50 ELSE 0 END, CASE WHEN i % 10 = 9 THEN 50 ELSE 99 END,
              CASE WHEN i % 10 = 9 THEN 0 ELSE 1 END,
              now() - make_interval(secs => :jobs - i), now() - make_interval(secs => :jobs - i),
              CASE WHEN i % 10 = 9 THEN NULL ELSE now() END
         FROM generate_series(1, :jobs) i""",
    """INSERT INTO jobs (id, tenant, status, teacher, mode, top_logprobs, sampling, cache_policy, metadata, total,
                         body_sha256, n_pending, n_completed, started_at)
       VALUES (:running, 'bench', 'running', :teacher, 'generate', 5, '{}', 'use', '{}', 1000, repeat('0', 64),
               400, 600, now() - interval '10 minutes')""",
    """INSERT INTO job_progress (job_id, at, completed, cached, failed)
       SELECT :running, now() - make_interval(secs => 600 - 3 * i), 3 * i, 0, 0 FROM generate_series(1, 200) i""",
]


def fill(rt, jobs: int) -> None:
    with rt.engine.begin() as connection:
        for statement in FILL_SQL:
            connection.execute(sa.text(statement), {"teacher": TEACHER, "jobs": jobs, "running": RUNNING})
    with rt.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("VACUUM ANALYZE"))


def p50_ms(client, url: str, rounds: int = 20) -> float:
    client.get(url)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return statistics.median(times)


def measure(jobs: int) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.tenants.service import TenantService

    with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
        fill(rt, jobs)
        with rt.sessions() as db, db.begin():
            _, key = TenantService(db).create_key("bench")
        middle = "job_" + format(jobs // 2, "x").rjust(32, "0")
        with TestClient(create_app(rt, run_finalizer=False)) as client:
            client.cookies.set("teachercache_key", key)
            return {
                "/ui/jobs": p50_ms(client, "/ui/jobs"),
                "/ui/jobs?status=failed": p50_ms(client, "/ui/jobs?status=failed"),
                "/ui/jobs?after=<half-way>": p50_ms(client, f"/ui/jobs?after={middle}"),
                "/ui/jobs/{id}": p50_ms(client, f"/ui/jobs/{RUNNING}"),
                "/ui/jobs/{id}/live": p50_ms(client, f"/ui/jobs/{RUNNING}/live"),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=1_000)
    args = parser.parse_args()
    small, large = measure(args.small), measure(args.jobs)
    rows = [{"page": page, f"p50 ms at {args.small:,} jobs": small[page], f"p50 ms at {args.jobs:,} jobs": large[page],
             "ratio": large[page] / small[page]} for page in small]
    report(f"Status page: {args.small:,} vs {args.jobs:,} jobs", rows, f"status_page_{args.jobs}.json",
           {"small": args.small, "jobs": args.jobs})


if __name__ == "__main__":
    main()
