"""The progress bar wait() draws on stderr: finished requests (completed+cached+failed) of total.

One line that fits an 80-column terminal even at 10^7 requests: the job's status, a bar of
fixed width, done/total, cached and failed, elapsed time. The job's id is said once, above it."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
