"""Student-side loading: the columnar loader's padded and packed batches from local shards and
streamed over loopback HTTP, against Arrow decoding the same files alone, in the same run; and
downloading a job's shards.

    .venv/bin/python -m bench.bench_loader [--requests 8000] [--max-tokens 64] [--top-logprobs 20]
                                           [--shard-rows 2000] [--batch-size 32] [--tokens-per-batch 8192]
                                           [--repeats 5]

The shards come from a scripted-engine job (no model: the figures are the loader's, not the
teacher's) of requests x max_tokens completion tokens with their top-k, computed into a
scratch database. The API runs as its own process (`teachercache serve` on 127.0.0.1), as it
would on another host, so serving does not share this process's GIL. Then, in this one
process with one torch thread:

- loader: the rate is top-k tokens per second: completion positions, each with its k
  alternatives, landed in torch tensors. The reference (marked *) is Arrow decoding the local
  files alone: the same reader, columns and soft-label decoding as the loader's, no tensors;
  the ceiling of any loader over these files. Against it: ShardDataset(layout="padded",
  rows_per_batch=--batch-size) and (layout="packed", tokens_per_batch=--tokens-per-batch) from
  local disk and streamed with HTTP range requests; the padded layout with DataLoader workers 1
  and 2 (from local disk; persistent workers, as a training loop keeps them, started and run
  through one epoch before the rounds, so an epoch is timed, not a start-up); and the row path of before
  (ShardDataset rows + collate_topk, local disk), for comparison.
- download: Client.download (resumable, sha256-verified) into a fresh folder, against
  reading the same files from local disk (the reference), and reading and hashing them
  (what the download also does).

The cases run in rounds (each case once per round), and each figure is the median of --repeats
rounds, so a load that drifts over the run weighs on every case alike. "Local disk" is the page
cache (the files were just written), the best case a local copy can give.
Writes bench/results/loader.json.
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
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset

import teachercache as tc
from bench.processes import free_port, wait_until_answering
from teachercache.layouts import LAYOUT_COLUMNS
from teachercache.stream import read_shard

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


def targets_of(batch: dict[str, Any]) -> int:
    """The top-k tokens a batch carries, in either layout."""
    return len(batch["target_positions"]) if "target_positions" in batch else int(batch["labels_mask"].sum())


def load_batches(dataset: IterableDataset | DataLoader) -> int:
    """Iterate ShardDataset's own batches (a DataLoader only moves them); the top-k tokens they held."""
    return sum(targets_of(batch) for batch in dataset)


def persistent_loader(dataset: IterableDataset, workers: int) -> DataLoader:
    """A DataLoader as a training loop keeps one: its worker processes started once and kept
    across epochs, and one epoch run here so that what is timed is an epoch, not a start-up."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True, prefetch_factor=4)
    load_batches(loader)
    return loader


def load_rows(dataset: IterableDataset, batch_size: int) -> int:
    """The row path: a DataLoader with collate_topk over the dataset's Python rows."""
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


def decode_only(files: list[Path]) -> int:
    """The ceiling: the loader's own reader (schema check, page checksums, soft-label decoding) over
    the columns a layout reads, and nothing after it: no numpy, no tensors."""
    tokens = 0
    for file in files:
        for batch in read_shard(None, {"path": str(file)}, LAYOUT_COLUMNS):
            tokens += pc.sum(pc.list_value_length(batch.column("completion_token_ids"))).as_py() or 0
    return tokens


def measure(client: tc.Client, job: dict[str, Any], files: list[Path], args: argparse.Namespace,
            scratch: Path) -> list[dict[str, Any]]:
    """Every case's median time and rate, and its rate against its reference (marked *)."""
    padded, packed = ({"layout": "padded", "rows_per_batch": args.batch_size},
                      {"layout": "packed", "tokens_per_batch": args.tokens_per_batch})

    def dataset(source: str, **options: Any) -> tc.ShardDataset:
        where = {"job": job, "client": client} if source == "http" else {"shards": files}
        return tc.ShardDataset(**where, shuffle=False, **options)

    tokens, megabytes = "top-k tokens/s", "MB/s"
    one_worker, two_workers = (persistent_loader(dataset("local", **padded), n) for n in (1, 2))
    cases: list[tuple[str, str, Callable[[], int], str]] = [
        ("loader", "local disk*: Arrow decode only (the ceiling)", lambda: decode_only(files), tokens),
        ("loader", "local disk: padded", lambda: load_batches(dataset("local", **padded)), tokens),
        ("loader", "local disk: packed", lambda: load_batches(dataset("local", **packed)), tokens),
        ("loader", "local disk: padded, read inline (read_ahead=0)",
         lambda: load_batches(dataset("local", read_ahead=0, **padded)), tokens),
        ("loader", "local disk: packed, read inline (read_ahead=0)",
         lambda: load_batches(dataset("local", read_ahead=0, **packed)), tokens),
        ("loader", "HTTP loopback: padded", lambda: load_batches(dataset("http", **padded)), tokens),
        ("loader", "HTTP loopback: packed", lambda: load_batches(dataset("http", **packed)), tokens),
        ("loader", "local disk: padded, 1 DataLoader worker (persistent)", partial(load_batches, one_worker), tokens),
        ("loader", "local disk: padded, 2 DataLoader workers (persistent)", partial(load_batches, two_workers),
         tokens),
        ("loader", "local disk: rows + collate_topk (the row path)",
         lambda: load_rows(dataset("local", columns=LAYOUT_COLUMNS), args.batch_size), tokens),
        ("download", "HTTP loopback: Client.download", lambda: download_into_fresh_folder(client, job, scratch),
         megabytes),
        ("download", "local disk*: read", lambda: read_files(files), megabytes),
        ("download", "local disk: read + sha256", lambda: read_and_hash_files(files), megabytes),
    ]
    timings: list[list[float]] = [[] for _ in cases]
    amounts = [0] * len(cases)
    for _ in range(args.repeats):
        for index, (_, _, run, _) in enumerate(cases):
            started = time.perf_counter()
            amounts[index] = run()
            timings[index].append(time.perf_counter() - started)
    rows = []
    for (measure_name, source, _, unit), seconds_each, amount in zip(cases, timings, amounts):
        seconds = statistics.median(seconds_each)
        rate = amount / seconds / (MB if unit == megabytes else 1)
        rows.append({"measure": measure_name, "source": source, "seconds": seconds, "rate": rate, "unit": unit})
    for row in rows:
        reference = next(r for r in rows if r["measure"] == row["measure"] and "*" in r["source"])
        row["x reference"] = row["rate"] / reference["rate"]
    return rows


# -- the run --------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--shard-rows", type=int, default=2000, help="rows per job shard")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per padded batch")
    parser.add_argument("--tokens-per-batch", type=int, default=8192, help="tokens per packed batch")
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
