"""The use case a worker calls once a result shard is stored: index what it produced."""

from __future__ import annotations

from typing import Any

from sqlalchemy import orm

from service.ids import new_id
from service.jobs.repository import JobRepository
from service.models import Shard
from service.queue.repository import TaskRepository
from service.storage import StoredShard


def index_result_shard(db: orm.Session, teacher: str, stored: StoredShard, entries: list[dict[str, Any]],
                       tokens: dict[str, int]) -> set[str]:
    """Finish the tasks still leased under `tokens` (fenced), index the shard and the cache
    entries of those tasks, and answer the requests waiting on them; the keys kept.

    A task whose lease was lost meanwhile is not finished and its rows are not indexed: the
    worker now holding it will index its own.
    """
    kept = TaskRepository(db).finish(tokens)
    jobs = JobRepository(db)
    shard_id = new_id("shard")
    jobs.add_shard(Shard(id=shard_id, kind="result", path=stored.path, rows=stored.rows, bytes=stored.bytes,
                         sha256=stored.sha256))
    jobs.add_results([{**e, "teacher": teacher, "shard_id": shard_id} for e in entries if e["cache_key"] in kept])
    jobs.resolve_requests(sorted(kept))
    return kept
