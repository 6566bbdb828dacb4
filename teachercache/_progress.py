"""The progress bar wait() draws on stderr: finished requests (completed+cached+failed) of total.

One line that fits an 80-column terminal even at 10^7 requests: the job's status, a bar of
fixed width, done/total, cached and failed, elapsed time. The job's id is said once, above it."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from teachercache._states import FINISHED

BAR_WIDTH = 16


def finished_requests(job: dict[str, Any]) -> int:
    counts = job.get("counts") or {}
    return sum(int(counts.get(key) or 0) for key in ("completed", "cached", "failed"))


def wants_progress(progress: bool | None) -> bool:
    """None means: draw a bar only for a person watching a terminal."""
    return sys.stderr.isatty() if progress is None else progress


class WaitProgress:
    """A rich bar updated from job objects; a no-op when disabled."""

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self._progress: Progress | None = None
        self._task: Any = None
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=BAR_WIDTH),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=console or Console(stderr=True),
                transient=False,
            )

    def __enter__(self) -> WaitProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, job: dict[str, Any]) -> None:
        if self._progress is None:
            return
        counts = job.get("counts") or {}
        description, detail = f"{job.get('status', ''):<10}", _detail(counts)
        total = int(counts.get("total") or 0) or None
        if self._task is None:
            self._progress.console.print(f"job {job.get('id')}")
            self._task = self._progress.add_task(description, total=total, detail=detail)
        self._progress.update(self._task, completed=finished_requests(job), total=total, description=description,
                              detail=detail)


def _detail(counts: dict[str, Any]) -> str:
    return f"cached {counts.get('cached', 0)} failed {counts.get('failed', 0)}"


class JobWatch:
    """What `teachercache status JOB --watch` redraws: status, counts, rate and ETA.

    The rate is measured between polls (finished requests per second over the last
    `window` polls), so it follows the job as it speeds up or slows down; the ETA is
    the pending requests at that rate."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.samples: list[tuple[float, int]] = []  # (monotonic seconds, finished requests)

    def observe(self, job: dict[str, Any], at: float) -> None:
        self.samples = [*self.samples, (at, finished_requests(job))][-self.window:]

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def eta_s(self, job: dict[str, Any]) -> float | None:
        pending = int((job.get("counts") or {}).get("pending") or 0)
        rate = self.rate()
        if job.get("status") in FINISHED or not pending:
            return 0.0 if job.get("status") in FINISHED else None
        return pending / rate if rate else None

    def render(self, job: dict[str, Any]) -> Any:
        counts = job.get("counts") or {}
        total = int(counts.get("total") or 0)
        done = finished_requests(job)
        rate, eta = self.rate(), self.eta_s(job)
        table = Table(title=f"job {job.get('id')}", show_header=True, title_justify="left")
        for column in ("status", "done", "completed", "cached", "failed", "pending", "req/s", "ETA"):
            table.add_column(column, justify="left" if column == "status" else "right")
        table.add_row(str(job.get("status")), f"{done:,}/{total:,}", f"{int(counts.get('completed') or 0):,}",
                      f"{int(counts.get('cached') or 0):,}", f"{int(counts.get('failed') or 0):,}",
                      f"{int(counts.get('pending') or 0):,}", "–" if rate is None else f"{rate:,.1f}",
                      _duration(eta))
        return table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
