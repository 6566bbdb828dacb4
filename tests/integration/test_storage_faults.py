"""A full disk mid-job: the worker releases what it could not store (no attempt counted), stops
claiming until storage takes writes again, and the job then succeeds with every row correct.

The disk fills two ways: every write raising ENOSPC (injected, runs anywhere), and a real tmpfs
of a few MiB holding the shards, filled with a ballast file and then freed (needs the right to
mount, as root in a container usually has; skipped, saying why, where it is missing)."""

from __future__ import annotations

import errno
import logging
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"


TMPFS_SIZE = "4m"


class InjectedFullDisk:
    """While set, every storage write fails with ENOSPC, as on a full disk."""

    def __init__(self, rt, monkeypatch) -> None:
        self.full = threading.Event()
        write = rt.storage.write

        def write_unless_full(rel, fill):
            if self.full.is_set():
                raise OSError(errno.ENOSPC, "No space left on device", rel)
            return write(rel, fill)

        monkeypatch.setattr(rt.storage, "write", write_unless_full)

    def fill(self) -> None:
        self.full.set()

    def free(self) -> None:
        self.full.clear()


class TmpfsFullDisk:
    """A real filesystem filled up: a ballast file takes every free block of the tmpfs."""

    def __init__(self, root: Path) -> None:
        self.ballast = root / "ballast"

    def fill(self) -> None:
        with open(self.ballast, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (64 << 10))
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC

    def free(self) -> None:
        self.ballast.unlink()


@pytest.fixture
def small_tmpfs():
    root = Path(tempfile.mkdtemp(prefix="teachercache-tmpfs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        root.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the injected ENOSPC case runs")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
        root.rmdir()


@pytest.fixture
def storage_uri(request):
    """Shards on the small tmpfs for the tmpfs case; the state folder otherwise."""
    if request.node.callspec.params.get("full_disk") == "tmpfs":
        return str(request.getfixturevalue("small_tmpfs"))
    return None


@pytest.fixture(params=["injected", "tmpfs"])
def full_disk(request, rt, monkeypatch):
    if request.param == "injected":
        return InjectedFullDisk(rt, monkeypatch)
    return TmpfsFullDisk(Path(rt.settings.storage_uri))


def storage_errors(api) -> float:
    text = api.get("/metrics").text
    found = re.search(r'^teachercache_storage_errors_total\{teacher="%s"\} (\S+)$' % TEACHER, text, re.M)
    return float(found.group(1)) if found else 0.0


def expected_tokens(row: dict) -> list[int]:
    """What the scripted engine generates for this row's prompt (seed 0, one sample)."""
    request = SimpleNamespace(prompt_token_ids=row["prompt_token_ids"], mode="generate", top_logprobs=2,
                              sampling=SimpleNamespace(seed=0, max_tokens=4), response_token_ids=None)
    return ScriptedEngine()._sample(request, 0).completion_token_ids


def test_a_full_disk_mid_job_pauses_claiming_and_fails_nothing(api, rt, start_worker, full_disk, caplog):
    caplog.set_level(logging.INFO, logger="workers.loop")
    requests = [{"custom_id": f"r{i}", "prompt_token_ids": [1, 2, 100 + i]} for i in range(60)]
    job = api.post("/v1/jobs", json={"requests": requests, "top_logprobs": 2,
                                     "sampling": {"max_tokens": 4, "seed": 0}}).json()
    worker = start_worker(ScriptedEngine(step_delay_s=0.02, tokens_per_step=1), lease_s=2.0, max_inflight=8,
                          result_shard_rows=4, flush_s=0.1, storage_backoff_s=0.2, storage_backoff_max_s=0.8)
    deadline = time.monotonic() + 30
    while api.get(f"/v1/jobs/{job['id']}").json()["counts"]["completed"] < 8:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    full_disk.fill()
    # Longer than three leases: released tasks must not expire into attempts meanwhile.
    time.sleep(7)
    during = api.get(f"/v1/jobs/{job['id']}").json()
    assert worker.loop.storage_pause.paused
    with rt.sessions() as db:
        leased = db.execute(sa.text("SELECT count(*) FROM tasks WHERE state = 'leased'")).scalar_one()
        counted = db.execute(sa.text("SELECT max(attempts) FROM tasks WHERE state = 'pending'")).scalar_one()
    assert leased == 0 and counted == 0  # released, attempts given back, nothing claimed while full
    assert storage_errors(api) > 0
    full_disk.free()
    job = wait_for(api, job["id"], timeout=60)

    assert during["status"] in ("queued", "running") and during["counts"]["failed"] == 0
    assert job["status"] == "succeeded" and job["counts"]["completed"] == 60 and job["counts"]["failed"] == 0
    rows = download_rows(api, job)
    assert sorted(r["custom_id"] for r in rows) == sorted(r["custom_id"] for r in requests)
    assert all(r["error"] is None and r["completion_token_ids"] == expected_tokens(r) for r in rows)
    with rt.sessions() as db:
        errors = db.execute(sa.text("SELECT count(*) FROM tasks WHERE errors <> '[]'::jsonb")).scalar_one()
    assert errors == 0  # no attempt was recorded as failed or lost
    assert not worker.loop.storage_pause.paused
    messages = [r.getMessage() for r in caplog.records]
    assert any("storage write failed" in m and "No space left" in m for m in messages)
    assert any("claiming resumed" in m for m in messages)
