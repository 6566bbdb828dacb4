"""A background loop, in the API and in every worker, that moves jobs to their end.

It assembles the shards of jobs that are ready (any process may: the claim skips locked
jobs), every `reconcile_s` it fails the tasks whose last lease expired (and the requests
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

from sqlalchemy import orm

from service.db import db_retry, transaction
from service.jobs.repository import JobRepository
from service.openai_batch.service import finish_openai_batch
from service.queue.repository import TaskRepository
from service.results.assemble import AssemblyLimits, finalize_one
from service.results.repository import ResultRepository
from service.results.retention import sweep
from service.runtime import Runtime
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
    done = 0
    while True:
        with transaction(rt.sessions) as db:
            job = finalize_one(JobRepository(db), rt.storage, rt.teacher_metadata(),
                               AssemblyLimits.from_settings(rt.settings),
                               on_end=lambda ended: finish_openai_batch(db, rt.storage, rt.teachers, ended))
        if job is None:
            return done
        log.info("job %s finalized (%s)", job.id, job.status)  # or counted a failed attempt
        done += 1


class Finalizer:
    def __init__(self, rt: Runtime, poll_s: float = 0.5, reconcile_s: float = 2.0) -> None:
        self.rt = rt
        self.poll_s = poll_s
        self.reconcile_s = reconcile_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finalizer", daemon=True)

    def start(self) -> Finalizer:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        last_reconcile = last_sweep = last_progress = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_reconcile > self.reconcile_s:
                self._safely(reconcile)
                last_reconcile = time.monotonic()
            if time.monotonic() - last_progress > self.rt.settings.progress_every_s:
                self._safely(record_progress)
                last_progress = time.monotonic()
            if time.monotonic() - last_sweep > self.rt.settings.retention_sweep_s:
                self._safely(sweep)  # retention: expired jobs, the cache's budget (bounded)
                last_sweep = time.monotonic()
            self._safely(finalize_ready)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    @db_retry(attempts=3)
    def _attempt(self, step: Callable[[Runtime], object]) -> None:
        step(self.rt)

    def _safely(self, step: Callable[[Runtime], object]) -> None:
        try:
            self._attempt(step)
        except Exception:  # keep the loop alive: the next round retries
            log.exception("finalizer step %s failed", step.__name__)
