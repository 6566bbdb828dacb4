"""The use cases a worker calls on the work it holds: index a stored result shard, record a
failed attempt, give leases back. Each changes the tasks and, in the same transaction, answers
(or fails) the requests waiting on them, keeping their jobs' counters."""

from __future__ import annotations

from typing import Any

from sqlalchemy import orm

from service.ids import new_id
from service.models import Shard
from service.queue.repository import TaskRepository
from service.results.repository import ResultRepository
from service.storage import StoredShard


def index_result_shard(db: orm.Session, teacher: str, stored: StoredShard, entries: list[dict[str, Any]],
                       tokens: dict[str, int]) -> set[str]:
    """Finish the tasks still leased under `tokens` (fenced), index the shard and the cache
    entries of those tasks, and answer the requests waiting on them; the keys kept.

    A task whose lease was lost meanwhile is not finished and its rows are not indexed: the
    worker now holding it will index its own.
    """
    kept = TaskRepository(db).finish(tokens)
    results = ResultRepository(db)
    shard_id = new_id("shard")
    results.add_shard(Shard(id=shard_id, kind="result", path=stored.path, rows=stored.rows, bytes=stored.bytes,
                            sha256=stored.sha256))
    results.add_results([{**e, "teacher": teacher, "shard_id": shard_id} for e in entries if e["cache_key"] in kept])
    results.resolve_requests(sorted(kept))
    return kept


def record_failure(db: orm.Session, key: str, token: int, error: str, final: bool = False) -> str | None:
    """A failed attempt (fenced); a task out of attempts (or failed for good) fails its requests.
    The task's new state, or None when the lease was lost."""
    state = TaskRepository(db).record_failure(key, token, error, final=final)
    if state == "failed":
        ResultRepository(db).resolve_requests([key])
    return state


def release_tasks(db: orm.Session, held: dict[str, int], error: str | None) -> set[str]:
    """Give leases back (see TaskRepository.release); tasks out of attempts fail their requests."""
    released = TaskRepository(db).release(held, error)
    ResultRepository(db).resolve_requests(sorted(released))
    return released
