"""The embedded server that a new user's `make test` runs on is stopped when the run ends,
whether it passed, failed or was interrupted with Ctrl-C: no postgres process, no data
directory and no System V shared memory segment is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from service.settings import PROJECT_ROOT

PROBE = "tests/integration/embedded_probe.py"


def start_probe(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "probe.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TEACHERCACHE_DATABASE_URL", "DATABASE_URL")}
    env.update(PROBE_OUT=str(out), PROBE_MODE=mode)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "bt"),
               PROBE]
    return subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True), out


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the probe never reported its server"
        time.sleep(0.2)
    return json.loads(path.read_text())


def shared_memory_ids() -> set[int]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[1]) for line in lines}


def same_process_alive(pid: int, started: float) -> bool:
    """A zombie has exited: it only waits for an init that reaps slowly (as this sandbox's does)."""
    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("mode, expected_rc", [("pass", 0), ("fail", 1), ("wait", 2)])
def test_the_embedded_server_is_gone_when_the_run_ends(tmp_path, mode, expected_rc):
    process, out = start_probe(tmp_path, mode)
    server = wait_for_file(out, process)
    assert same_process_alive(server["pid"], server["started"]) and server["shm_id"] in shared_memory_ids()
    Path(f"{out}.ack").touch()  # now the probe may pass, fail or wait to be interrupted
    if mode == "wait":
        process.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    output, _ = process.communicate(timeout=120)
    assert process.returncode == expected_rc, output
    # `pg_ctl stop -w` returns once the server removed its pid file; its last exit may take a moment.
    deadline = time.monotonic() + 10
    while same_process_alive(server["pid"], server["started"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not same_process_alive(server["pid"], server["started"]), output
    assert not Path(server["data_dir"]).exists()
    assert server["shm_id"] not in shared_memory_ids()
