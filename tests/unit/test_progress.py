"""The progress bar wait() draws stays whole in an 80-column terminal, at any job size."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from teachercache._progress import WaitProgress


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
