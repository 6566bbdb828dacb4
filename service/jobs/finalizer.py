"""A background loop, in the API and in every worker, that moves jobs to their end.

It assembles the shards of jobs that are ready (any process may: the claim skips locked
jobs) as soon as Postgres notifies that one is (service/notify.py), every `reconcile_s` it fails the tasks whose last lease expired (and the requests
waiting on them), and every `retention_sweep_s` it runs the retention sweep
(service/results/retention.py).

Reconcile does work in proportion to what changed, never to what exists: every other change of
a task resolves the requests waiting on it in its own transaction (a submission that joins a
task finishing meanwhile answers its requests itself, and the counters on the job row move the
job on), so all that is left is what time changes: expired leases, found through their index.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import orm

from service.db import db_retry, transaction
from service.jobs.repository import JobRepository
from service.notify import JOBS_READY
from service.openai_batch.service import finish_openai_batch
from service.queue.repository import TaskRepository
from service.results.assemble import AssemblyLimits, finalize_one
from service.results.repository import ResultRepository
from service.results.retention import sweep
from service.runtime import Runtime
from service.states import JobStatus
from service.status.service import StatusService

log = logging.getLogger(__name__)


def reconcile(rt: Runtime) -> int:
    with transaction(rt.sessions) as db:
        return reconcile_in(db)


def reconcile_in(db: orm.Session) -> int:
    """Fail the tasks whose last lease expired and the requests waiting on them; how many tasks."""
    expired = TaskRepository(db).expire_exhausted()
    ResultRepository(db).resolve_requests(expired)
    return len(expired)


def record_progress(rt: Runtime) -> None:
    """The status page's chart: each running job's counts, every `progress_every_s`."""
    with transaction(rt.sessions) as db:
        StatusService(db).record_progress(rt.settings.progress_every_s)


def finalize_ready(rt: Runtime) -> int:
    """Assemble every ready job; return how many."""
    return finalize_round(rt).done


@dataclass(frozen=True)
class FinalizeRound:
    done: int  # jobs claimed and assembled (or counted a failed attempt)
    retry_at: datetime | None  # the earliest time a job whose assembly failed here may be tried again


def finalize_round(rt: Runtime) -> FinalizeRound:
    """Assemble every ready job, noting when a failed one is due again."""
    done, retry_at = 0, None
    while True:
        with transaction(rt.sessions) as db:
            job = finalize_one(JobRepository(db), rt.storage, rt.teacher_metadata(),
                               AssemblyLimits.from_settings(rt.settings),
                               on_end=lambda ended: finish_openai_batch(db, rt.storage, rt.teachers, ended))
        if job is None:
            return FinalizeRound(done, retry_at)
        log.info("job %s finalized (%s)", job.id, job.status)  # or counted a failed attempt
        if job.status == JobStatus.FINALIZING and job.finalize_not_before is not None:
            retry_at = min(retry_at or job.finalize_not_before, job.finalize_not_before)
        done += 1


class Finalizer:
    """The loop. It looks for ready jobs when told one may be (Postgres's JOBS_READY notification,
    or `wake()` from this process), when a failed assembly is due again, and otherwise every
    `idle_poll_s` (every `poll_s` while the listening connection is down), so an idle service
    runs one short query per `idle_poll_s`, not per `poll_s`."""

    def __init__(self, rt: Runtime, poll_s: float = 0.5, reconcile_s: float = 2.0,
                 idle_poll_s: float | None = None) -> None:
        self.rt = rt
        self.poll_s = poll_s
        self.reconcile_s = reconcile_s
        self.idle_poll_s = rt.settings.finalizer_idle_poll_s if idle_poll_s is None else idle_poll_s
        self._ready = threading.Event()  # a job may be ready: look now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finalizer", daemon=True)

    def start(self) -> Finalizer:
        self.rt.listener.subscribe(JOBS_READY, self._ready)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._ready.set()
        self._thread.join(timeout)
        self.rt.listener.unsubscribe(self._ready)

    def _run(self) -> None:
        settings = self.rt.settings
        periodic: list[tuple[Callable[[Runtime], object], float]] = [
            (reconcile, self.reconcile_s),  # expired leases
            (record_progress, settings.progress_every_s),  # the status page's chart
            (sweep, settings.retention_sweep_s),  # retention: expired jobs, the cache's budget (bounded)
        ]
        last_run = [0.0] * len(periodic)
        next_look = 0.0
        while not self._stop.is_set():
            for i, (step, every_s) in enumerate(periodic):
                if time.monotonic() - last_run[i] > every_s:
                    self._safely(step)
                    last_run[i] = time.monotonic()
            if self._ready.is_set() or time.monotonic() >= next_look:
                self._ready.clear()  # before the round: a notification during it makes another
                next_look = time.monotonic() + self._next_look_in(self._safely(finalize_round))
            due = min([next_look] + [last + every_s for last, (_, every_s) in zip(last_run, periodic)])
            self._ready.wait(max(due - time.monotonic(), 0.0) + 0.001)

    def _next_look_in(self, round_: object) -> float:
        interval = self.idle_poll_s if self.rt.listener.connected else self.poll_s
        if isinstance(round_, FinalizeRound) and round_.retry_at is not None:
            interval = min(interval, max((round_.retry_at - datetime.now(UTC)).total_seconds(), 0.0))
        return interval

    @db_retry(attempts=3)
    def _attempt(self, step: Callable[[Runtime], object]) -> object:
        return step(self.rt)

    def _safely(self, step: Callable[[Runtime], object]) -> object:
        try:
            return self._attempt(step)
        except Exception:  # keep the loop alive: the next round retries
            log.exception("finalizer step %s failed", step.__name__)
            return None
