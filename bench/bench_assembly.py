"""Assembly in bounded memory: seconds and peak RSS of assembling 10k / 100k / 1M-request jobs.

The jobs are seeded directly (no engine): scripted result shards (64 tokens, top-20 per
position) written through the storage port, indexed in Postgres, and a job of N requests
answered from them, left `finalizing`. Each assembly runs in a fresh child process that reports
its own RSS before and its peak RSS after (VmHWM), so the figure is the assembler's memory,
not this process's. RSS should stay flat as N grows: it is bounded by `assembly_batch_rows`.

    python -m bench.bench_assembly [--sizes 10000 100000 1000000] [--batch-rows 4096]

With `--openai` each job is an OpenAI batch's (chat endpoint, logprobs with top-20 on every
line), so the same finalization also writes the batch's output file, streamed from the job's
shards: the figures then include rendering that file (about 80 KB of JSON per request), and RSS
should stay as flat (results in bench/results/openai_output.json).

    python -m bench.bench_assembly --openai --sizes 1000 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

TEACHER = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
SHARD_ROWS = 2048  # rows per result shard, as a worker writes them (result_shard_rows)


def scripted_rows(count: int, tokens: int = 64, k: int = 20, seed: int = 0) -> pa.Table:
    """`count` result rows in the result-shard schema, built column-wise (no Python row objects)."""
    from teachercache.shard_format import RESULT_SCHEMA

    rng = np.random.default_rng(seed)

    def lists(values: pa.Array, size: int, n: int) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * size, size, dtype=np.int32)), values)

    positions = count * tokens
    ids = lists(pa.array(rng.integers(0, 49152, positions, dtype=np.int32)), tokens, count)
    logprobs = lists(pa.array(-rng.random(positions, dtype=np.float32)), tokens, count)
    top_ids = lists(lists(pa.array(rng.integers(0, 49152, positions * k, dtype=np.int32)), k, positions), tokens, count)
    top_lp = lists(lists(pa.array(-rng.random(positions * k, dtype=np.float32)), k, positions), tokens, count)
    prompt = lists(pa.array(np.tile(np.arange(16, dtype=np.int32), count)), 16, count)
    columns = {"cache_key": pa.array([f"k{i}" for i in range(count)]), "sample_index": pa.array(np.zeros(count, np.int32)),
               "prompt_token_ids": prompt, "completion_token_ids": ids, "completion_text": pa.array(["x" * 64] * count),
               "token_logprobs": logprobs, "top_token_ids": top_ids, "top_logprobs": top_lp,
               "finish_reason": pa.array(["length"] * count), "error": pa.nulls(count, pa.string()),
               "token_ranks": pa.nulls(count, pa.list_(pa.int32()))}
    for field in RESULT_SCHEMA:  # top-k rows: no sampled soft labels, no stop string or token
        columns.setdefault(field.name, pa.nulls(count, field.type))
    return pa.table(columns, schema=RESULT_SCHEMA)


def copy_rows(connection, table: str, columns: list[str], rows) -> None:
    with connection.cursor() as cursor, cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def seed_job(rt, requests: int, distinct: int = 8192, openai: bool = False) -> str:
    """A `finalizing` job of `requests` requests, answered from `distinct` scripted result rows
    (with `openai`, the job of an in-progress chat batch whose lines all asked for logprobs)."""
    from service.ids import new_id
    from service.models import Job, Shard
    from service.tenants.models import Tenant
    from teachercache.shard_format import shard_metadata

    distinct = min(distinct, requests)
    shard_ids = []
    with rt.sessions() as db, db.begin():
        db.merge(Tenant(name="bench"))
        db.flush()
        for start in range(0, distinct, SHARD_ROWS):
            rows = scripted_rows(min(SHARD_ROWS, distinct - start), seed=start)
            stored = rt.storage.write_table(f"results/bench/{new_id('shard')}.parquet", rows, shard_metadata({}))
            shard_ids.append(new_id("shard"))
            db.add(Shard(id=shard_ids[-1], kind="result", path=stored.path, rows=stored.rows, bytes=stored.bytes,
                         sha256=stored.sha256))
        job_id = new_id("job")
        batch_id = new_id("batch")
        metadata = {"openai_batch_id": batch_id, "openai_endpoint": CHAT, "openai_logprobs": True} if openai else {}
        db.add(Job(id=job_id, tenant="bench", status="finalizing", teacher=TEACHER, mode="generate", top_logprobs=20,
                   sampling={"max_tokens": 64}, cache_policy="use", metadata_=metadata, total=requests, body_sha256=""))
        if openai:
            from service.openai_batch.models import OpenAIBatch

            db.add(OpenAIBatch(id=batch_id, tenant="bench", input_file_id=new_id("file"), endpoint=CHAT,
                               completion_window="24h", status="in_progress", job_id=job_id, metadata_={},
                               request_total=requests))
        db.flush()
        connection = db.connection().connection.driver_connection
        copy_rows(connection, "results", ["cache_key", "teacher", "shard_id", "row_start", "row_count",
                                          "prompt_tokens", "completion_tokens"],
                  ((f"{job_id}-{i}", TEACHER, shard_ids[(i % distinct) // SHARD_ROWS], (i % distinct) % SHARD_ROWS,
                    1, 16, 64) for i in range(requests)))
        copy_rows(connection, "requests", ["job_id", "request_index", "custom_id", "cache_key", "state", "cached",
                                           "result_key", "prompt_tokens"],
                  ((job_id, i, f"q{i}", f"{job_id}-{i}", "done", True, f"{job_id}-{i}", 16) for i in range(requests)))
    return job_id


def assemble_here(database_url: str, state_dir: str, storage_uri: str | None, batch_rows: int) -> dict:
    """Finalize the one ready job in this process; time and memory of it."""
    from bench.common import rss_mb
    from service.jobs.finalizer import finalize_ready
    from service.runtime import Runtime
    from service.settings import PROJECT_ROOT, ServiceSettings

    rt = Runtime(ServiceSettings(database_url=database_url, state_dir=Path(state_dir), storage_uri=storage_uri,
                                 models_dir=PROJECT_ROOT / "models", assembly_batch_rows=batch_rows), database_url)
    rt.engine.connect().close()
    rt.storage  # noqa: B018 - built before the baseline
    before = rss_mb()
    started = time.perf_counter()
    done = finalize_ready(rt)
    seconds = time.perf_counter() - started
    peak = rss_mb(field="VmHWM")
    return {"finalized": done, "seconds": seconds, "rss_before_mb": before, "rss_peak_mb": peak,
            "rss_growth_mb": peak - before, "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20}


def assemble_in_child(rt, batch_rows: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_assembly", "--child", rt.database_url, str(rt.settings.state_dir),
         rt.settings.storage_uri or "", str(batch_rows)],
        cwd=Path(__file__).resolve().parent.parent, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        url, state, uri, batch = sys.argv[2:6]
        print(json.dumps(assemble_here(url, state, uri or None, int(batch))))
        return
    from bench.common import report, scratch_runtime

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batch-rows", type=int, default=4096)
    parser.add_argument("--openai", action="store_true", help="also write an OpenAI batch's output file")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
            started = time.perf_counter()
            seed_job(rt, size, openai=args.openai)
            seeded = time.perf_counter() - started
            result = assemble_in_child(rt, args.batch_rows)
            job_bytes = sum(p.stat().st_size for p in (Path(state) / "shards" / "jobs").rglob("*.parquet"))
            output = {}
            if args.openai:
                files = sum(p.stat().st_size for p in (Path(state) / "shards" / "files").rglob("*.jsonl"))
                output = {"output_file_mb": files / 2**20}
            rows.append({"requests": size, "seed_s": seeded, **{k: v for k, v in result.items() if k != "finalized"},
                         "job_shards_mb": job_bytes / 2**20, **output, "rows_per_s": size / result["seconds"]})
            print(rows[-1], flush=True)
    if args.openai:
        report("assembly + OpenAI output file (chat, logprobs, top-20)", rows, "openai_output.json",
               {"args": vars(args)})
    else:
        report("assembly (scripted rows: 64 tokens, top-20)", rows, "assembly.json", {"args": vars(args)})


if __name__ == "__main__":
    main()
