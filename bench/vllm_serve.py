"""`vllm serve` for the default teacher on a loopback port, as the remote-teacher tests and
benchmark run it: the flags the local adapter uses (raw logprobs, no chunked prefill on CPU,
float32, seed 0, no generation config), max logprobs 21 (the chat path asks for top-k + 1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

SERVED_NAME = "smollm2"


class ServerFailed(RuntimeError):
    """vllm serve exited, or did not answer in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "2048", "--max-logprobs", "21", "--logprobs-mode", "raw_logprobs",
            "--no-enable-chunked-prefill", "--seed", "0", "--generation-config", "vllm", "--disable-log-stats"]


@contextmanager
def vllm_serve(model_dir: Path, log: Path, start_s: float = 400, kv_cache_gb: str = "1") -> Iterator[str]:
    """Yields the base URL (`http://127.0.0.1:<port>/v1`); the server's process group is stopped after."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": kv_cache_gb}
    process = subprocess.Popen(serve_command(model_dir, port), env=env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(process, base_url, log, start_s)
        yield base_url
    finally:
        stop_process_group(process)


def wait_until_serving(process: subprocess.Popen, base_url: str, log: Path, start_s: float) -> None:
    deadline = time.monotonic() + start_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise ServerFailed(f"vllm serve did not come up within {start_s} s:\n{log.read_text()[-3000:]}")


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
