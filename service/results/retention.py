"""Retention: finished jobs expire, and the cache keeps to its budget, least recently used first.

One bounded sweep, run by every finalizer loop (API and workers) every `retention_sweep_s`:
each step is one transaction touching at most `retention_batch` jobs or entries, chosen by an
index (`FOR UPDATE SKIP LOCKED`, so sweepers in many processes share the work). Storage objects
are removed only after the transaction that dropped their index rows has committed: a crash in
between leaves unreferenced objects, never an index row pointing at nothing.

What each removal keeps:
- an expired job goes exactly as `DELETE /v1/jobs/{id}` removes it (the same code path): its
  row, requests and job shards; the cache it was answered from stays.
- an evicted entry loses its `results` row and its finished task; its result shard object goes
  once no entry points at it. Jobs that already have their shards keep them (a job shard is a
  copy). An entry an unfinished job still needs is never evicted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.db import transaction
from service.jobs.repository import JobRepository
from service.jobs.service import JobService
from service.queue.workers import WorkerRepository
from service.results.repository import ResultRepository
from service.runtime import Runtime
from service.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swept:
    jobs: int = 0
    entries: int = 0
    workers: int = 0


def sweep(rt: Runtime) -> Swept:
    """One round of retention: expire jobs, evict entries, prune gone workers, each a bounded
    transaction."""
    return Swept(jobs=expire_jobs(rt), entries=evict_entries(rt), workers=prune_workers(rt))


def prune_workers(rt: Runtime) -> int:
    """Delete up to `retention_batch` workers not seen for `worker_gone_s` (their engine totals kept)."""
    with transaction(rt.sessions) as db:
        pruned = WorkerRepository(db).prune(rt.settings.worker_gone_s, rt.settings.retention_batch)
    if pruned:
        log.info("retention: %d gone workers pruned", pruned)
    return pruned


def expire_jobs(rt: Runtime) -> int:
    retention_s = rt.settings.job_retention_s
    if not retention_s:
        return 0
    with transaction(rt.sessions) as db:
        paths: list[str] = []
        expired = JobRepository(db).expired_jobs(retention_s, rt.settings.retention_batch)
        for job_id, tenant in expired:
            paths += JobService(db, tenant).delete(job_id)
    remove_objects(rt.storage, paths)
    if expired:
        log.info("retention: %d finished jobs expired", len(expired))
    return len(expired)


def evict_entries(rt: Runtime) -> int:
    """Entries beyond `cache_max_entries` (least recently used first), then entries unused for
    longer than `cache_max_idle_s`; at most `retention_batch` each."""
    settings, limit = rt.settings, rt.settings.retention_batch
    evicted = 0
    if settings.cache_max_entries is not None:
        with transaction(rt.sessions) as db:
            over = ResultRepository(db).over_budget(settings.cache_max_entries, limit)
        evicted += evict_step(rt, 0.0, over)
    if settings.cache_max_idle_s:
        evicted += evict_step(rt, settings.cache_max_idle_s, limit)
    if evicted:
        log.info("retention: %d cache entries evicted", evicted)
    return evicted


def evict_step(rt: Runtime, idle_s: float, n: int) -> int:
    """One transaction: evict up to `n` entries unused for over `idle_s` seconds."""
    if n <= 0:
        return 0
    with transaction(rt.sessions) as db:
        evicted, paths = ResultRepository(db).evict(idle_s, n)
    remove_objects(rt.storage, paths)
    return evicted


def remove_objects(storage: Storage, paths: list[str]) -> None:
    """Remove objects whose index rows are gone (committed); one that fails stays, unreferenced."""
    for path in paths:
        try:
            storage.delete(path)
        except Exception:  # noqa: BLE001 - an orphan object is harmless; the next one may succeed
            log.exception("could not remove %s", path)
