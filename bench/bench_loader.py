"""Student-side loading: streaming and downloading a job's shards over loopback HTTP, against
reading the same files from local disk, in the same run.

    .venv/bin/python -m bench.bench_loader [--requests 2000] [--max-tokens 64] [--top-logprobs 20]
                                           [--shard-rows 500] [--batch-size 32] [--repeats 5]

The shards come from a scripted-engine job (no model: the figures are the loader's, not the
teacher's) of requests x max_tokens completion tokens with their top-k, computed into a
scratch database. The API runs as its own process (`teachercache serve` on 127.0.0.1), as it
would on another host, so serving does not share this process's GIL. Then, in this one
process (no DataLoader workers):

- loader: ShardDataset + collate_topk over the job's shards streamed with HTTP range
  requests, against the same shard files read from local disk through the same DataLoader
  and collate (the reference, marked *), and against Arrow decoding them alone (no Python
  rows, no tensors: what a columnar collate could approach). The rate is top-k tokens per
  second: completion positions, each with its k alternatives, landed in torch tensors.
- download: Client.download (resumable, sha256-verified) into a fresh folder, against
  reading the same files from local disk (the reference), and reading and hashing them
  (what the download also does).

Each figure is the median of --repeats runs; "local disk" is the page cache (the files were
just written), the best case a local copy can give. Writes bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset

import teachercache as tc
from bench.processes import free_port, wait_until_answering
from teachercache.stream import DEFAULT_BATCH_SIZE

TEACHER = "smollm2-135m-instruct"
MB = 1e6


# -- the job --------------------------------------------------------------------------


@contextmanager
def api_process(rt: Any, port: int) -> Iterator[str]:
    """`teachercache serve` on 127.0.0.1:port over the scratch database and shard folder."""
    env = {
        **os.environ,
        "TEACHERCACHE_DATABASE_URL": rt.database_url,
        "TEACHERCACHE_STATE_DIR": str(rt.settings.state_dir),
        "TEACHERCACHE_SHARD_ROWS": str(rt.settings.shard_rows),
        "TEACHERCACHE_FINALIZER_POLL_S": "0.1",
    }
    command = [sys.executable, "-m", "teachercache", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(server, f"{url}/healthz", 60, "the API", interval=0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextmanager
def scripted_worker(rt: Any, max_tokens: int) -> Iterator[None]:
    """A worker loop on the scripted engine in a thread, stopped before anything is measured."""
    from workers.loop import WorkerLoop
    from workers.scripted_engine import ScriptedEngine
    from workers.settings import WorkerSettings

    settings = WorkerSettings(**{**rt.settings.model_dump(), "flush_s": 0.5})
    loop = WorkerLoop(rt, ScriptedEngine(tokens_per_step=max_tokens), settings, TEACHER)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.request_stop()
        thread.join(120)


def produce_job(client: tc.Client, args: argparse.Namespace) -> dict[str, Any]:
    requests = [{"custom_id": f"r{i}", "prompt_token_ids": [1, 2, 3, 10 + i]} for i in range(args.requests)]
    job = client.submit(requests, teacher=TEACHER, top_logprobs=args.top_logprobs,
                        sampling={"max_tokens": args.max_tokens})
    return client.wait(job, poll_interval=0.5, timeout=1800, raise_on_failure=True)


# -- what is measured -------------------------------------------------------------------


class LocalShardRows(IterableDataset):
    """The rows of local shard files, read as ShardDataset reads a remote one (iter_batches,
    to_pylist), so only the source differs between the two loader runs."""

    def __init__(self, files: list[Path], batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.files, self.batch_size = files, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for file in self.files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=self.batch_size):
                yield from batch.to_pylist()


def load_all(dataset: IterableDataset, batch_size: int) -> int:
    """Run a DataLoader with collate_topk over the dataset; the top-k tokens it produced."""
    tokens = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=tc.collate_topk):
        tokens += int(batch["labels_mask"].sum())
    return tokens


def download_into_fresh_folder(client: tc.Client, job: dict[str, Any], scratch: Path) -> int:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    return sum(path.stat().st_size for path in client.download(job, folder))


def read_files(files: list[Path]) -> int:
    return sum(len(file.read_bytes()) for file in files)


def read_and_hash_files(files: list[Path]) -> int:
    total = 0
    for file in files:
        data = file.read_bytes()
        hashlib.sha256(data).digest()
        total += len(data)
    return total


def median_seconds(run: Callable[[], int], repeats: int) -> tuple[float, int]:
    """(median seconds, what one run returned: tokens or bytes)."""
    timings, amount = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        amount = run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings), amount


# -- the run --------------------------------------------------------------------------


def decode_only(files: list[Path]) -> int:
    """The Arrow-level ceiling: decode the files, build no Python rows and no tensors."""
    tokens = 0
    for file in files:
        table = pq.read_table(file)  # every column, as the row readers decode them
        tokens += pc.sum(pc.list_value_length(table.column("completion_token_ids"))).as_py() or 0
    return tokens


def measure(client: tc.Client, job: dict[str, Any], files: list[Path], args: argparse.Namespace,
            scratch: Path) -> list[dict[str, Any]]:
    """Every case's median time and rate, and its rate against its reference (marked *)."""
    remote = tc.ShardDataset(job=job, client=client, shuffle=False)
    tokens, megabytes = "top-k tokens/s", "MB/s"
    local = LocalShardRows(files)
    cases = [
        ("loader", "HTTP loopback: ShardDataset", lambda: load_all(remote, args.batch_size), tokens),
        ("loader", "local disk*: same rows, same collate", lambda: load_all(local, args.batch_size), tokens),
        ("loader", "local disk: Arrow decode only", lambda: decode_only(files), tokens),
        ("download", "HTTP loopback: Client.download", lambda: download_into_fresh_folder(client, job, scratch),
         megabytes),
        ("download", "local disk*: read", lambda: read_files(files), megabytes),
        ("download", "local disk: read + sha256", lambda: read_and_hash_files(files), megabytes),
    ]
    rows = []
    for measure_name, source, run, unit in cases:
        seconds, amount = median_seconds(run, args.repeats)
        rate = amount / seconds / (MB if unit == megabytes else 1)
        rows.append({"measure": measure_name, "source": source, "seconds": seconds, "rate": rate, "unit": unit})
    for row in rows:
        reference = next(r for r in rows if r["measure"] == row["measure"] and "*" in r["source"])
        row["x reference"] = row["rate"] / reference["rate"]
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--shard-rows", type=int, default=500, help="rows per job shard")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per collated batch")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def run(args: argparse.Namespace, state: Path, rt: Any) -> tuple[dict[str, Any], list[Path], list[dict[str, Any]]]:
    """Produce the job behind a served API, stop the worker, then measure: (job, files, rows)."""
    from bench.common import bench_key

    # The loader's worker processes build their own clients: they find the key in the environment.
    os.environ["TEACHERCACHE_API_KEY"] = bench_key(rt)
    with api_process(rt, free_port()) as url, tc.Client(url) as client:
        with scripted_worker(rt, args.max_tokens):
            started = time.perf_counter()
            job = produce_job(client, args)
            print(f"job {job['id']}: {args.requests} requests in {time.perf_counter() - started:.1f} s", flush=True)
        files = sorted((Path(rt.settings.shards_uri) / "jobs" / job["id"]).glob("*.parquet"))
        return job, files, measure(client, job, files, args, state)


def main() -> None:
    args = parse_args()
    from bench.common import report, scratch_runtime

    torch.set_num_threads(1)  # one process, one core: the loader's own cost, not intra-op parallelism
    with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state), shard_rows=args.shard_rows) as rt:
        job, files, rows = run(args, Path(state), rt)
    shard_bytes = sum(shard["bytes"] for shard in job["shards"])
    title = (f"loader and download, {args.requests} requests x {args.max_tokens} tokens, top-{args.top_logprobs}:"
             f" {len(files)} shards, {shard_bytes / MB:.1f} MB")
    report(title, rows, "loader.json", {"args": vars(args), "shards": len(files), "shard_bytes": shard_bytes})


if __name__ == "__main__":
    main()
