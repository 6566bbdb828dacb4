"""The fleet's autoscaling signal: TaskRepository.pending_by_teacher at growing table sizes.

    .venv/bin/python -m bench.bench_fleet_signal [--sizes 10000 100000 1000000] [--cap 257] [--repeat 50]

For each size N, in one scratch database grown step by step (rows written with
generate_series, not through the API: only the query is measured): N more tasks for the
teacher, with a pending request each, of which all but 100 are then finished, so the table
holds mostly done work with a small live queue (the usual state of a long-running service),
plus a backlog of N pending tasks for a second teacher (the worst case for a capped count).
Reports, for each teacher, the median latency of the query and the buffers its plan touches
(EXPLAIN ANALYZE BUFFERS: its work, which the machine's load does not change), each as a
ratio to the smallest size measured in the same run, and whether the plan scans a table.
Bounded means: no sequential scan, and the buffers stay flat while N grows 100-fold.
Uses TEACHERCACHE_DATABASE_URL or the local Postgres. Writes bench/results/fleet_signal.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from bench.common import report, scratch_runtime  # noqa: E402
from service.db import transaction  # noqa: E402
from service.queue.repository import PENDING_WORK_SQL, TaskRepository  # noqa: E402

LIVE, BACKLOG = "live-queue", "backlog"
LIVE_PENDING = 100

FILL_SQL = sa.text(
    """
    WITH new AS (
        INSERT INTO tasks (key, teacher, state, mode, prompt_token_ids, sampling, top_logprobs)
        SELECT :teacher || '-' || g, :teacher, 'pending', 'generate', ARRAY[1, 2, g], '{}'::jsonb, 5
          FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g
        RETURNING key)
    INSERT INTO requests (job_id, request_index, custom_id, cache_key, state, prompt_tokens)
    SELECT :job, CAST(row_number() OVER () AS integer) + CAST(:first AS integer) - 1, key, key, 'pending', 3 FROM new
    """
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--cap", type=int, default=257, help="what a fleet of 1 replica at 256 per replica asks")
    p.add_argument("--repeat", type=int, default=50)
    return p.parse_args(argv)


def add_job(db, job: str, teacher: str) -> None:
    db.execute(sa.text("INSERT INTO tenants (name) VALUES ('bench') ON CONFLICT DO NOTHING"))
    db.execute(sa.text(
        "INSERT INTO jobs (id, tenant, status, teacher, mode, top_logprobs, sampling, cache_policy, metadata, total, "
        "body_sha256) VALUES (:id, 'bench', 'running', :teacher, 'generate', 5, '{}', 'use', '{}', 0, '')"),
        {"id": job, "teacher": teacher})


def grow(rt, have: int, size: int) -> None:
    """Tasks (and their requests) up to `size` per teacher; the live queue keeps 100 pending."""
    with transaction(rt.sessions) as db:
        for teacher in (LIVE, BACKLOG):
            db.execute(FILL_SQL, {"teacher": teacher, "first": have + 1, "last": size, "job": f"job-{teacher}"})
        # The live teacher's older work is finished: done tasks, done requests.
        db.execute(sa.text("UPDATE tasks SET state = 'done' WHERE teacher = :t AND state = 'pending'"), {"t": LIVE})
        db.execute(sa.text("UPDATE requests SET state = 'done' WHERE job_id = :j AND state = 'pending'"),
                   {"j": f"job-{LIVE}"})
        db.execute(sa.text("UPDATE tasks SET state = 'pending' WHERE key IN "
                           "(SELECT key FROM tasks WHERE teacher = :t ORDER BY created_at DESC, key LIMIT :n)"),
                   {"t": LIVE, "n": LIVE_PENDING})
        db.execute(sa.text("UPDATE requests SET state = 'pending' WHERE cache_key IN "
                           "(SELECT key FROM tasks WHERE teacher = :t AND state = 'pending')"), {"t": LIVE})
    with rt.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("VACUUM ANALYZE tasks"))
        connection.execute(sa.text("VACUUM ANALYZE requests"))


def plan_work(rt, teacher: str, cap: int) -> tuple[int, bool]:
    """Buffers the query touches (shared hits + reads: its work, whatever the machine's load)
    and whether its plan scans a table sequentially."""
    with rt.engine.connect() as connection:
        plan = connection.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + PENDING_WORK_SQL.text),
                                  {"teacher": teacher, "cap": cap}).scalar()[0]["Plan"]
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"], "Seq Scan" in json.dumps(plan)


def median_ms(rt, teacher: str, cap: int, repeat: int) -> tuple[float, int]:
    timings, counted = [], 0
    for _ in range(repeat):
        with transaction(rt.sessions) as db:
            start = time.perf_counter()
            counted = TaskRepository(db).pending_by_teacher(teacher, cap).pending
            timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings), counted


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
        with transaction(rt.sessions) as db:
            for teacher in (LIVE, BACKLOG):
                add_job(db, f"job-{teacher}", teacher)
        have, baseline = 0, {}
        for size in sorted(args.sizes):
            started = time.perf_counter()
            grow(rt, have, size)
            have = size
            fill_s = time.perf_counter() - started
            for teacher in (LIVE, BACKLOG):
                ms, counted = median_ms(rt, teacher, args.cap, args.repeat)
                buffers, seq_scan = plan_work(rt, teacher, args.cap)
                baseline.setdefault(teacher, (ms, buffers))
                rows.append({"tasks_per_teacher": size, "teacher": teacher, "pending_counted": counted,
                             "median_ms": ms, "ms_ratio": ms / baseline[teacher][0], "buffers": buffers,
                             "buffers_ratio": buffers / baseline[teacher][1], "seq_scan": seq_scan,
                             "fill_s": fill_s})
    report("pending_by_teacher: latency vs table size", rows, "fleet_signal.json",
           {"cap": args.cap, "repeat": args.repeat, "machine": platform.platform()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
