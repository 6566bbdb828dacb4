"""Retention: finished jobs expire, and the cache keeps to its budget, least recently used first.

One bounded sweep, run by every finalizer loop (API and workers) every `retention_sweep_s`:
each step is one transaction touching at most `retention_batch` jobs or entries, chosen by an
index (`FOR UPDATE SKIP LOCKED`, so sweepers in many processes share the work). Storage objects
are removed only after the transaction that dropped their index rows has committed: a crash in
between leaves unreferenced objects, never an index row pointing at nothing.

What each removal keeps:
- an expired job goes exactly as `DELETE /v1/jobs/{id}` removes it (the same code path): its
  row, requests and job shards; the cache it was answered from stays. A job of more requests
  than `retention_delete_rows` is hidden (`deleting`) with its shards at once, and its requests
  are deleted a bounded chunk per transaction by later steps, its row last.
- an expired OpenAI file (a batch's output or error file past its `output_expires_after`) goes
  as `DELETE /v1/files/{id}` removes it: its row and its object; the batch keeps the id.
- an idle task (no request waits on it) older than `idle_task_retention_s` goes: a later
  submission of the same request queues it again, with its attempts counted from zero.
- an evicted entry (over the entry, idle or byte budget) loses its `results` row and its
  finished task; its result shard's row and object go once no entry points at it (only then do
  its bytes leave the byte budget's count). Jobs that already have their shards keep them (a job shard is a
  copy). An entry an unfinished job still needs is never evicted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.db import transaction
from service.jobs.repository import JobRepository
from service.jobs.service import JobService
from service.openai_batch.repository import OpenAIBatchRepository
from service.queue.repository import TaskRepository
from service.queue.workers import WorkerRepository
from service.results.repository import ResultRepository
from service.runtime import Runtime
from service.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swept:
    jobs: int = 0
    entries: int = 0
    request_rows: int = 0  # requests of jobs being deleted, removed in chunks
    files: int = 0
    workers: int = 0
    idle_tasks: int = 0


def sweep(rt: Runtime) -> Swept:
    """One round of retention: expire jobs and files, purge jobs being deleted, evict entries,
    prune gone workers and old idle tasks, each step a bounded transaction."""
    return Swept(jobs=expire_jobs(rt), request_rows=purge_deleting(rt), entries=evict_entries(rt),
                 files=expire_files(rt), workers=prune_workers(rt), idle_tasks=purge_idle_tasks(rt))


def expire_files(rt: Runtime) -> int:
    with transaction(rt.sessions) as db:
        paths = OpenAIBatchRepository(db).delete_expired_files(rt.settings.retention_batch)
    remove_objects(rt.storage, paths)
    if paths:
        log.info("retention: %d expired files removed", len(paths))
    return len(paths)


def prune_workers(rt: Runtime) -> int:
    """Delete up to `retention_batch` workers not seen for `worker_gone_s` (their engine totals kept)."""
    with transaction(rt.sessions) as db:
        pruned = WorkerRepository(db).prune(rt.settings.worker_gone_s, rt.settings.retention_batch)
    if pruned:
        log.info("retention: %d gone workers pruned", pruned)
    return pruned


def purge_idle_tasks(rt: Runtime) -> int:
    """Delete up to `retention_batch` idle tasks queued more than `idle_task_retention_s` ago."""
    if not rt.settings.idle_task_retention_s:
        return 0
    with transaction(rt.sessions) as db:
        purged = TaskRepository(db).delete_idle(rt.settings.idle_task_retention_s, rt.settings.retention_batch)
    if purged:
        log.info("retention: %d idle tasks deleted", purged)
    return purged


def expire_jobs(rt: Runtime) -> int:
    retention_s = rt.settings.job_retention_s
    if not retention_s:
        return 0
    with transaction(rt.sessions) as db:
        paths: list[str] = []
        expired = JobRepository(db).expired_jobs(retention_s, rt.settings.retention_batch)
        for job_id, tenant in expired:
            paths += JobService(db, tenant).delete(job_id, rt.settings.retention_delete_rows)
    remove_objects(rt.storage, paths)
    if expired:
        log.info("retention: %d finished jobs expired", len(expired))
    return len(expired)


def purge_deleting(rt: Runtime) -> int:
    """Delete the requests of jobs marked `deleting`, `retention_delete_rows` per transaction and
    at most `retention_delete_chunks` transactions this round, then each emptied job's row; the
    requests deleted. Resumable: a crash or the round's end leaves the job marked, to go on next
    round (possibly in another process)."""
    settings, deleted = rt.settings, 0
    for _ in range(settings.retention_delete_chunks):
        with transaction(rt.sessions) as db:
            jobs = JobRepository(db)
            job_ids = jobs.deleting_jobs(1)
            if not job_ids:
                break
            gone = jobs.delete_requests_chunk(job_ids[0], settings.retention_delete_rows)
            if gone < settings.retention_delete_rows:  # nothing left after this chunk
                jobs.delete_job(job_ids[0])
        deleted += gone
    if deleted:
        log.info("retention: %d requests of deleted jobs removed", deleted)
    return deleted


def evict_entries(rt: Runtime) -> int:
    """Entries beyond `cache_max_entries` (least recently used first), then entries unused for
    longer than `cache_max_idle_s`, then least recently used entries while the result shards
    take more than `cache_max_bytes`; at most `retention_batch` each."""
    settings, limit = rt.settings, rt.settings.retention_batch
    evicted = 0
    if settings.cache_max_entries is not None:
        with transaction(rt.sessions) as db:
            over = ResultRepository(db).over_budget(settings.cache_max_entries, limit)
        evicted += evict_step(rt, 0.0, over)
    if settings.cache_max_bytes is not None:
        evicted += evict_for_bytes(rt, settings.cache_max_bytes, limit)
    if settings.cache_max_idle_s:
        evicted += evict_step(rt, settings.cache_max_idle_s, limit)
    if evicted:
        log.info("retention: %d cache entries evicted", evicted)
    return evicted


def evict_for_bytes(rt: Runtime, max_bytes: int, limit: int) -> int:
    """One bounded pass of the byte budget: evict the least recently used entries whose shares
    of their shards' bytes cover how far the cache is over (at most `limit`).

    Space comes back when a result shard has no entry left (its row and object go with its
    last entry), so a cache still over after this pass is evicted further in the next sweep:
    the entries a worker flushed together share a shard and, used together, age together.
    """
    with transaction(rt.sessions) as db:
        results = ResultRepository(db)
        over = results.cache_bytes() - max_bytes
        n = results.entries_covering(over, limit) if over > 0 else 0
    return evict_step(rt, 0.0, n)


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
