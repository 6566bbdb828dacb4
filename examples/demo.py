"""`make demo`: the main job end to end on this machine.

Brings the embedded stack up (`teachercache up`: embedded Postgres, API, one vLLM worker for
the default teacher), submits examples/prompts.jsonl, waits with a progress bar, downloads the
shards, prints what was produced, and stops the stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

import teachercache as tc
from teachercache.shard_format import read_table

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "prompts.jsonl"
LOGS = ROOT / ".state" / "logs"
PORT = int(os.environ.get("TEACHERCACHE_DEMO_PORT", "8765"))
URL = f"http://127.0.0.1:{PORT}"
console = Console()


def start_stack() -> subprocess.Popen:
    console.print(f"[bold]Starting the embedded stack[/] (Postgres, API on {URL}, one vLLM worker)...")
    console.print(f"Its logs: {(LOGS / 'api.log').relative_to(ROOT)} and {(LOGS / 'worker.log').relative_to(ROOT)}")
    command = [sys.executable, "-m", "teachercache", "up", "--port", str(PORT), "--log-dir", str(LOGS)]
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / "api.log").open("a") as log:
        return subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(stack: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.poll() is not None:
            raise SystemExit(f"the stack exited with code {stack.returncode}")
        try:
            if httpx.get(f"{URL}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the API did not come up")


def wait_worker_online(client: tc.Client, timeout: float = 600) -> None:
    """The worker registers once its engine is loaded; timing starts after that."""
    console.print("Waiting for the worker to load the teacher into vLLM...")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(t.get("workers", 0) > 0 for t in client.teachers()):
            return
        time.sleep(1)
    raise SystemExit("no worker came online")


def stop_stack(stack: subprocess.Popen) -> None:
    if stack.poll() is None:
        os.killpg(stack.pid, signal.SIGINT)
        try:
            stack.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
    console.print("[bold]Stack stopped.[/]")


def run_job(client: tc.Client, out_dir: Path) -> tuple[dict, list[Path], float]:
    started = time.monotonic()
    job = client.submit(jsonl_path=PROMPTS, top_logprobs=20,
                        sampling={"max_tokens": 64, "temperature": 0.7, "seed": 0}, metadata={"dataset": "demo"})
    console.print(f"Submitted job [bold]{job['id']}[/] ({job['counts']['total']} requests, "
                  f"{job['counts']['cached']} already cached)")
    job = client.wait(job, poll_interval=0.5, timeout=1800, progress=True, raise_on_failure=True)
    elapsed = time.monotonic() - started
    return job, client.download(job, out_dir / job["id"]), elapsed


def summarize(job: dict, paths: list[Path], elapsed: float) -> None:
    table = pa.concat_tables([read_table(p) for p in paths]).to_pylist() if paths else []
    completion = sum(len(r["completion_token_ids"]) for r in table)
    counts = job["counts"]
    summary = Table("", "", title=f"job {job['id']}: {job['status']}", show_header=False)
    for name, value in [
        ("requests", f"{counts['total']} ({counts['completed']} computed, {counts['cached']} cached, {counts['failed']} failed)"),
        ("rows", str(len(table))),
        ("completion tokens", str(completion)),
        ("prompt tokens", str(sum(len(r["prompt_token_ids"]) for r in table))),
        ("wall time", f"{elapsed:.1f} s (POST to downloaded shards)"),
        ("tokens/s", f"{completion / elapsed:.1f}"),
    ]:
        summary.add_row(name, value)
    console.print(summary)
    if paths:
        console.print(f"shards downloaded to {paths[0].parent.relative_to(ROOT)}/")
    files = Table("file", "size", "rows")
    for path in paths:
        files.add_row(path.name, f"{path.stat().st_size:,} bytes", f"{pq.ParquetFile(path).metadata.num_rows} rows")
    console.print(files)
    if table:
        show_example(next((r for r in table if r["custom_id"].startswith("chat")), table[0]))


def show_example(row: dict) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "smollm2-135m-instruct")
    console.print(f"\n[bold]{row['custom_id']}[/]  prompt: {tokenizer.decode(row['prompt_token_ids'])!r}")
    console.print(f"completion ({row['finish_reason']}): {row['completion_text']!r}")
    positions = Table(title="top-5 alternatives at a few positions (raw teacher logprobs)")
    positions.add_column("pos")
    positions.add_column("token (logprob)")
    positions.add_column("top-5")
    for t in range(0, len(row["completion_token_ids"]), max(1, len(row["completion_token_ids"]) // 5))[:5]:
        token = tokenizer.decode([row["completion_token_ids"][t]])
        alternatives = ", ".join(f"{tokenizer.decode([i])!r} {lp:.2f}"
                                 for i, lp in zip(row["top_token_ids"][t][:5], row["top_logprobs"][t][:5]))
        positions.add_row(str(t), f"{token!r} ({row['token_logprobs'][t]:.2f})", alternatives)
    console.print(positions)


def main() -> None:
    stack = start_stack()
    try:
        wait_healthy(stack)
        # No key given: for a service on this machine the client reads the one the embedded
        # stack wrote for tenant `local` to .state/api-key on its first start.
        with tc.Client(URL, timeout=60) as client:
            wait_worker_online(client)
            job, paths, elapsed = run_job(client, ROOT / ".state" / "demo-output")
        summarize(job, paths, elapsed)
    finally:
        stop_stack(stack)


if __name__ == "__main__":
    main()
