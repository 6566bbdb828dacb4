"""The progress bar wait() draws stays whole in an 80-column terminal, at any job size."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from teachercache._progress import JobWatch, WaitProgress


@pytest.mark.parametrize("total", [34, 10_000_000])
def test_the_bar_fits_80_columns(total):
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    job = {"id": "job_0123456789abcdef0123456789abcdef", "status": "running",
           "counts": {"total": total, "completed": total // 2, "cached": 3, "failed": 1}}
    with WaitProgress(True, console=console) as progress:
        progress.update(job)
        progress.update({**job, "status": "finalizing", "counts": {**job["counts"], "completed": total - 4}})
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", out.getvalue()).replace("\r", "\n")  # cursor moves
    lines = [line for line in screen.splitlines() if line.strip()]
    assert lines[0].strip() == f"job {job['id']}"
    last = lines[-1].rstrip()
    assert len(last) <= 80 and "…" not in last
    assert last.startswith("finalizing") and f"{total}/{total}" in last and "cached 3 failed 1" in last
    assert last.endswith("0:00:00")  # the elapsed time is still on the line


def job_at(status: str, completed: int, pending: int, total: int = 100) -> dict:
    return {"id": "job_x", "status": status,
            "counts": {"total": total, "completed": completed, "cached": 0, "failed": 0, "pending": pending}}


def test_the_watch_rate_follows_the_last_polls_and_the_eta_is_pending_at_that_rate():
    watch = JobWatch(window=3)
    watch.observe(job_at("running", 0, 100), at=0.0)
    assert watch.rate() is None and watch.eta_s(job_at("running", 0, 100)) is None  # one poll: no rate yet
    watch.observe(job_at("running", 10, 90), at=1.0)
    watch.observe(job_at("running", 20, 80), at=2.0)
    assert watch.rate() == 10.0 and watch.eta_s(job_at("running", 20, 80)) == 8.0
    watch.observe(job_at("running", 60, 40), at=3.0)  # faster now: the oldest poll leaves the window
    assert watch.rate() == 25.0 and watch.eta_s(job_at("running", 60, 40)) == 1.6
    done = job_at("succeeded", 100, 0)
    watch.observe(done, at=4.0)
    assert watch.eta_s(done) == 0.0


def test_the_watch_table_shows_status_counts_rate_and_eta():
    watch = JobWatch()
    watch.observe(job_at("running", 0, 1000, total=1000), at=0.0)
    watch.observe(job_at("running", 500, 500, total=1000), at=10.0)
    console = Console(width=120, record=True)
    console.print(watch.render(job_at("running", 500, 500, total=1000)))
    text = console.export_text()
    assert "job job_x" in text and "running" in text and "500/1,000" in text
    assert "50.0" in text and "10 s" in text  # 50 requests/s, 500 pending
