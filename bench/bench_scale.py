"""The control plane at scale: hot paths with 10^7 rows against the same at 10^4, same run.

    .venv/bin/python -m bench.bench_scale [--rows 1000000] [--small 10000] [--cached 20000]
                                          [--workers 1,2,4] [--worker-requests 4000]
    .venv/bin/python -m bench.bench_scale --rows 10000000 --workers ""   # the 10^7 run (manual: ~15 min to fill)

1. Hot paths. Two scratch databases are filled directly in SQL (generate_series): `--small`
   and `--rows` requests, tasks and cache entries (one running job holding all of them, a tenth
   of its requests pending), then VACUUM ANALYZE and a checkpoint. On each, after one warm-up
   round: `GET /v1/jobs/{id}` p50/p99 (200
   polls), `/metrics` (20 scrapes), one claim of 16 tasks (50 claims, each released), one
   reconcile pass (20 passes); the ratio large/small is the figure (1.0: no growth).
   EXPLAIN (ANALYZE, BUFFERS) of the hot statements on the large fill goes to
   bench/results/scale_plans_<rows>.txt (kept in docs/query-plans.md).
2. Workers: `--worker-requests` new requests through 1, 2 and 4 worker processes
   (`TEACHERCACHE_ENGINE=scripted`), POST to every request indexed, requests/s.
3. A fully cached job of `--cached` requests (computed first by the largest worker count), POST
   to downloaded shards, with the API's (this process, peak over the whole run) and the
   workers' peak RSS.
4. With `--cached-file N` (N = 1000000 for issue 16's figure), instead of 1-3: a fully cached
   job of N requests from a JSONL file. Computing 10^6 requests with scripted workers would
   take most of an hour here, so the cache is seeded as workers would leave it: result shards
   of `--seed-shard-rows` results each (one sample of 4 tokens with their top-5, the scripted
   job's shape) written through the service's storage, their entries COPYed into `results`.
   Then, timed: `POST /v1/files`, `POST /v1/jobs {"input_file_id"}` (every request answered
   from the cache), the finalizer assembling the job shards, and downloading them; this
   process's peak RSS (API and finalizer run in it; no worker runs).

Writes bench/results/scale_<rows>.json, scale_workers.json, scale_cached.json
(scale_cached_file.json with --cached-file).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

TEACHER = "smollm2-135m-instruct"
JOB = "job_" + "5ca1e" * 6 + "50"  # the id format the routes accept

FILL_SQL = [
    """INSERT INTO tenants (name) VALUES ('bench') ON CONFLICT DO NOTHING""",
    """INSERT INTO shards (id, kind, path, rows, bytes, sha256)
       VALUES ('shard_scale', 'result', 'results/none.parquet', :rows, 1, repeat('0', 64))""",
    """INSERT INTO jobs (id, tenant, status, teacher, mode, top_logprobs, sampling, cache_policy, metadata, total,
                         body_sha256, n_pending, n_completed, started_at, sent_prompt_tokens, sent_completion_tokens)
       VALUES (:job, 'bench', 'running', :teacher, 'generate', 5, '{}', 'use', '{}', :rows, repeat('0', 64),
               :pending, :rows - :pending, now(), 3 * (:rows - :pending), 4 * (:rows - :pending))""",
    """INSERT INTO results (cache_key, teacher, shard_id, row_start, row_count, prompt_tokens, completion_tokens)
       SELECT 'k-' || i, :teacher, 'shard_scale', i, 1, 3, 4 FROM generate_series(1, :rows - :pending) i""",
    """INSERT INTO tasks (key, teacher, state, mode, prompt_token_ids, sampling, top_logprobs, waiters, turn,
                         finished_at)
       SELECT 'k-' || i, :teacher, CASE WHEN i > :rows - :pending THEN 'pending' ELSE 'done' END, 'generate',
              ARRAY[1, 2, i], '{"max_tokens": 4}', 5, CASE WHEN i > :rows - :pending THEN 1 ELSE 0 END, i,
              CASE WHEN i > :rows - :pending THEN NULL ELSE now() END
         FROM generate_series(1, :rows) i""",
    """INSERT INTO requests (job_id, request_index, custom_id, cache_key, state, cached, result_key, prompt_tokens)
       SELECT :job, i - 1, 'r' || i, 'k-' || i, CASE WHEN i > :rows - :pending THEN 'pending' ELSE 'done' END,
              false, CASE WHEN i > :rows - :pending THEN NULL ELSE 'k-' || i END, 3
         FROM generate_series(1, :rows) i""",
]
PLAN_STATEMENTS = {
    "claim (16 tasks)": ("service.queue.repository", "CLAIM_SQL",
                         {"teacher": TEACHER, "owner": "plan", "limit": 16, "lease_s": 30.0,
                          "interactive_limit": 12, "batch_limit": 16}),
    "reconcile: expire exhausted leases": ("service.queue.repository", "EXPIRE_EXHAUSTED_SQL", {}),
    "resolve the requests of 16 finished tasks": ("service.results.repository", "RESOLVE_SQL", "keys"),
    "tenant pending (submission limit)": ("service.jobs.repository", "TENANT_PENDING_SQL", {"tenant": "bench"}),
    "metrics: pending tasks (bounded)": ("service.jobs.repository", "PENDING_TASKS_SQL", {"cap": 10_000}),
    "metrics: cache entries (bounded)": ("service.results.repository", "CACHE_ENTRIES_SQL", {"cap": 10_000}),
    "cache stats of a tenant": ("service.results.repository", "CACHE_LOOKUPS_SQL", {"tenant": "bench"}),
    "cancel the job (a tenth of it pending)": ("service.jobs.repository", "CANCEL_SQL", {"job_id": JOB}),
}


def fill(rt, rows: int) -> float:
    started = time.perf_counter()
    with rt.engine.begin() as db:
        for statement in FILL_SQL:
            db.execute(sa.text(statement), {"rows": rows, "pending": rows // 10, "job": JOB, "teacher": TEACHER})
    with rt.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
        db.execute(sa.text("VACUUM ANALYZE"))
        # The fill's gigabytes of WAL are flushed now, not by a checkpoint during the timed part
        # (a commit waits on its WAL flush: a busy disk is timed as a slow claim otherwise).
        db.execute(sa.text("CHECKPOINT"))
    return time.perf_counter() - started


def timings(run, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        run()
        out.append((time.perf_counter() - started) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def hot_paths(rt) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from bench.common import bench_auth
    from service.db import transaction
    from service.http.app import create_app
    from service.jobs.finalizer import reconcile
    from service.queue.repository import TaskRepository

    def claim_once():
        with transaction(rt.sessions) as db:
            claimed = TaskRepository(db).claim(TEACHER, "bench", 16, 30.0)
        return claimed

    claim_ms = []
    for _ in range(50):
        started = time.perf_counter()
        claimed = claim_once()
        claim_ms.append((time.perf_counter() - started) * 1000)
        with transaction(rt.sessions) as db:
            TaskRepository(db).release({t.key: t.lease_token for t in claimed})
    with TestClient(create_app(rt, run_finalizer=False), headers=bench_auth(rt)) as api:
        polls = timings(lambda: api.get(f"/v1/jobs/{JOB}").raise_for_status(), 200)
        scrapes = timings(lambda: api.get("/metrics").raise_for_status(), 20)
    passes = timings(lambda: reconcile(rt), 20)
    return {"GET /v1/jobs/{id} p50 ms": p(polls, 0.5), "GET /v1/jobs/{id} p99 ms": p(polls, 0.99),
            "/metrics p50 ms": p(scrapes, 0.5), "claim p50 ms": p(claim_ms, 0.5), "claim p99 ms": p(claim_ms, 0.99),
            "reconcile pass p50 ms": p(passes, 0.5)}


def plans(rt) -> str:
    import importlib

    out = []
    with rt.engine.connect() as db:
        keys = list(db.scalars(sa.text("SELECT key FROM tasks WHERE state = 'done' ORDER BY turn DESC LIMIT 16")))
        db.rollback()
        for title, (module, name, params) in PLAN_STATEMENTS.items():
            statement = getattr(importlib.import_module(module), name)
            params = {"keys": keys} if params == "keys" else params
            transaction = db.begin()
            plan = db.execute(sa.text(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {statement.text}"), params).scalars()
            out.append(f"### {title}\n\n```\n" + "\n".join(plan) + "\n```\n")
            transaction.rollback()  # EXPLAIN ANALYZE runs the statement: leave the fill as it was
    return "\n".join(out)


def rss_mib(pid: int | str = "self") -> float:
    """The process's peak RSS (0 once it is gone)."""
    from bench.common import rss_mb

    try:
        return rss_mb(pid, "VmHWM")
    except FileNotFoundError:
        return 0.0


def start_workers(rt, n: int) -> list[subprocess.Popen]:
    from service.settings import PROJECT_ROOT

    env = {**os.environ, "TEACHERCACHE_DATABASE_URL": rt.database_url, "TEACHERCACHE_STATE_DIR": str(rt.settings.state_dir),
           "TEACHERCACHE_ENGINE": "scripted", "TEACHERCACHE_FLUSH_S": "0.5", "TEACHERCACHE_CLAIM_POLL_S": "0.05",
           "TEACHERCACHE_MAX_INFLIGHT": "256", "TEACHERCACHE_LOG_LEVEL": "WARNING"}
    workers = [subprocess.Popen([sys.executable, "-m", "workers"], env=env, cwd=PROJECT_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with rt.engine.connect() as db:
            if db.scalar(sa.text("SELECT count(*) FROM workers WHERE stopped_at IS NULL")) >= n:
                return workers
        time.sleep(0.2)
    raise RuntimeError("workers did not start")


def stop_workers(workers: list[subprocess.Popen]) -> float:
    peak = max((rss_mib(w.pid) for w in workers if w.poll() is None), default=0.0)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait(60)
    return peak


def body(start: int, count: int) -> dict:
    requests = [{"custom_id": f"r{i}", "prompt_token_ids": [1, 2, 3, i]} for i in range(start, start + count)]
    return {"teacher": TEACHER, "top_logprobs": 5, "sampling": {"max_tokens": 4}, "requests": requests}


def worker_runs(rt, counts: list[int], requests: int) -> tuple[list[dict], float]:
    """requests/s indexed with n worker processes (fresh prompts each run); the last run's body
    stays in the cache for the cached-job run."""
    from fastapi.testclient import TestClient

    from bench.common import bench_auth
    from service.http.app import create_app

    rows, peak = [], 0.0
    with TestClient(create_app(rt), headers=bench_auth(rt)) as api:
        for run, n in enumerate(counts):
            workers = start_workers(rt, n)
            started = time.perf_counter()
            job = api.post("/v1/jobs", json=body(run * requests, requests)).json()
            while (job := api.get(f"/v1/jobs/{job['id']}").json())["counts"]["pending"] > 0:
                time.sleep(0.1)
            seconds = time.perf_counter() - started
            peak = max(peak, stop_workers(workers))
            rows.append({"workers": n, "requests": requests, "seconds": seconds, "requests_per_s": requests / seconds})
    return rows, peak


def cached_job(rt, start: int, count: int, workers: int) -> dict:
    """Compute `count` prompts once (with `workers` processes), then time the same job again."""
    import pyarrow.parquet as pq
    from fastapi.testclient import TestClient

    from bench.common import bench_auth
    from service.http.app import create_app

    with TestClient(create_app(rt), headers=bench_auth(rt)) as api:
        running = start_workers(rt, workers)
        job = api.post("/v1/jobs", json=body(start, count)).json()
        while (job := api.get(f"/v1/jobs/{job['id']}").json())["status"] != "succeeded":
            time.sleep(0.2)
        worker_peak = stop_workers(running)
        started = time.perf_counter()
        job = api.post("/v1/jobs", json=body(start, count)).json()
        assert job["counts"]["cached"] == count, job["counts"]
        while (job := api.get(f"/v1/jobs/{job['id']}").json())["status"] != "succeeded":
            time.sleep(0.1)
        rows = sum(pq.read_table(io.BytesIO(api.get(s["url"]).content)).num_rows for s in job["shards"])
        seconds = time.perf_counter() - started
    return {"requests": count, "rows": rows, "seconds": seconds, "api_peak_rss_mib": rss_mib(),
            "worker_peak_rss_mib": worker_peak}


def file_prompt(i: int) -> list[int]:
    """Request i's prompt: distinct for every i below 10^8, every id inside the vocabulary."""
    return [1, 2, 3 + i // 40000, i % 40000]


def file_request(i: int) -> dict:
    return {"custom_id": f"r{i}", "prompt_token_ids": file_prompt(i)}


SEED_TOKENS, SEED_TOP = 4, 5  # the scripted job's shape: body()'s max_tokens and top_logprobs


def seeded_result_table(keys: list[str], first: int):
    """Result-shard rows for `keys` (requests first, first + 1, ...), one sample each: bench_assembly's
    scripted rows with these keys and prompts."""
    import pyarrow as pa

    from bench.bench_assembly import scripted_rows

    table = scripted_rows(len(keys), SEED_TOKENS, SEED_TOP, seed=first)
    prompts = pa.array([file_prompt(i) for i in range(first, first + len(keys))], pa.list_(pa.int32()))
    for name, column in (("cache_key", pa.array(keys)), ("prompt_token_ids", prompts)):
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def seed_cache(rt, count: int, shard_rows: int) -> float:
    """Index `count` results for file_request(0..count)'s requests as workers would have (module
    docstring, 4.); the seconds it took."""
    from bench.bench_assembly import copy_rows
    from service.jobs.schemas import JobCreate
    from service.jobs.service import JobWriter
    from teachercache.shard_format import parquet_options, shard_metadata

    started = time.perf_counter()
    teacher = rt.teachers.get(TEACHER)
    job = JobCreate.model_validate({**body(0, 1), "requests": [file_request(0)]})
    key_of = JobWriter(None, None, job, teacher).key_of  # type: ignore[arg-type]  # keys need neither
    metadata = shard_metadata(rt.teacher_metadata().get(TEACHER, {}))
    for first in range(0, count, shard_rows):
        indexes = range(first, min(first + shard_rows, count))
        keys = [key_of(file_prompt(i), None) for i in indexes]
        table = seeded_result_table(keys, first)
        stored = rt.storage.write_table(f"results/{TEACHER}/seeded/{first:09d}.parquet", table, metadata,
                                        **parquet_options(table.schema))
        shard_id = f"shard_seed{first:09d}"
        with rt.sessions() as db, db.begin():
            db.execute(sa.text("INSERT INTO shards (id, kind, path, rows, bytes, sha256) "
                               "VALUES (:id, 'result', :path, :rows, :bytes, :sha256)"),
                       {"id": shard_id, "path": stored.path, "rows": stored.rows, "bytes": stored.bytes,
                        "sha256": stored.sha256})
            copy_rows(db.connection().connection.driver_connection, "results",
                      ["cache_key", "teacher", "shard_id", "row_start", "row_count", "prompt_tokens", "completion_tokens"],
                      ((key, TEACHER, shard_id, row, 1, len(file_prompt(i)), SEED_TOKENS)
                       for row, (i, key) in enumerate(zip(indexes, keys))))
    return time.perf_counter() - started


def cached_file_job(rt, count: int, shard_rows: int) -> dict:
    """A fully cached job of `count` requests from a JSONL file, POST /v1/files to its shards downloaded."""
    import json

    import pyarrow.parquet as pq
    from fastapi.testclient import TestClient

    from bench.common import bench_auth
    from service.http.app import create_app

    seed_s = seed_cache(rt, count, shard_rows)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cached.jsonl"
        with path.open("w") as f:
            f.writelines(json.dumps(file_request(i), separators=(",", ":")) + "\n" for i in range(count))
        with TestClient(create_app(rt), headers=bench_auth(rt)) as api:
            started = time.perf_counter()
            with path.open("rb") as data:
                uploaded = api.post("/v1/files", files={"file": (path.name, data)}, data={"purpose": "batch"})
            assert uploaded.status_code == 200, uploaded.text
            upload_s = time.perf_counter() - started
            envelope = {k: v for k, v in body(0, 0).items() if k != "requests"}
            response = api.post("/v1/jobs", json={**envelope, "input_file_id": uploaded.json()["id"]})
            assert response.status_code == 201, response.text
            job = response.json()
            created_s = time.perf_counter() - started
            assert job["counts"]["cached"] == count, job["counts"]
            while (job := api.get(f"/v1/jobs/{job['id']}").json())["status"] != "succeeded":
                time.sleep(0.1)
            assembled_s = time.perf_counter() - started
            rows = sum(pq.read_table(io.BytesIO(api.get(s["url"]).content)).num_rows for s in job["shards"])
            seconds = time.perf_counter() - started
    assert rows == count, rows
    return {"requests": count, "rows": rows, "seed_s": seed_s, "upload_s": upload_s,
            "create_s": created_s - upload_s, "assemble_s": assembled_s - created_s,
            "download_s": seconds - assembled_s, "seconds": seconds, "job_shards": len(job["shards"]),
            "api_peak_rss_mib": rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="the large fill (10^7 for the manual run)")
    parser.add_argument("--small", type=int, default=10_000, help="the baseline fill")
    parser.add_argument("--cached", type=int, default=20_000, help="the fully cached job's requests")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--worker-requests", type=int, default=4000)
    parser.add_argument("--cached-file", type=int, default=0, help="only the seeded, fully cached file job (4.)")
    parser.add_argument("--seed-shard-rows", type=int, default=1000, help="results per seeded result shard")
    args = parser.parse_args()

    from bench.common import RESULTS, report, scratch_runtime

    if args.cached_file:
        with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
            row = cached_file_job(rt, args.cached_file, args.seed_shard_rows)
        report(f"fully cached job from a {args.cached_file:,}-request file, POST to downloaded shards", [row],
               "scale_cached_file.json", {"args": vars(args)})
        return

    figures, fills = {}, {}
    for size in (args.small, args.rows):
        with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
            fills[size] = fill(rt, size)
            hot_paths(rt)  # warm-up: the caches hold what a running service's would
            figures[size] = hot_paths(rt)
            if size == args.rows:
                RESULTS.mkdir(parents=True, exist_ok=True)
                (RESULTS / f"scale_plans_{size}.txt").write_text(plans(rt))
    rows = [{"figure": name, f"{args.small:,} rows": figures[args.small][name],
             f"{args.rows:,} rows": figures[args.rows][name],
             "ratio": figures[args.rows][name] / max(figures[args.small][name], 1e-9)} for name in figures[args.small]]
    report(f"hot paths, {args.rows:,} rows against {args.small:,} (fill {fills[args.rows]:.0f} s)", rows,
           f"scale_{args.rows}.json", {"args": vars(args), "fill_s": fills})

    counts = [int(n) for n in args.workers.split(",") if n]
    if not counts:  # --workers "": the hot paths only (the 10^7 run)
        return
    with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
        worker_rows, worker_peak = worker_runs(rt, counts, args.worker_requests)
        cached = cached_job(rt, len(counts) * args.worker_requests, args.cached, max(counts))
    base = worker_rows[0]["requests_per_s"]
    for row in worker_rows:
        row["vs 1 worker"] = row["requests_per_s"] / base
    report("scripted-engine workers, POST to every request indexed", worker_rows, "scale_workers.json",
           {"args": vars(args), "worker_peak_rss_mib": worker_peak})
    report("fully cached job, POST to downloaded shards", [cached], "scale_cached.json", {"args": vars(args)})


if __name__ == "__main__":
    main()
