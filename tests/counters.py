"""Recounts from the requests themselves, to hold the maintained counters (on the job row, and
the waiters on each task) to: what a status poll reads must equal what the rows say."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import orm

RECOUNT_SQL = sa.text(
    """
    SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'done' AND NOT cached) AS completed,
           count(*) FILTER (WHERE state = 'done' AND cached) AS cached,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
           count(*) AS total
      FROM requests WHERE job_id = :job_id
    """
)
# Each distinct result once per job, as sent or as answered from the cache at submission.
SPEND_SQL = sa.text(
    """
    SELECT a.cached, COALESCE(sum(res.prompt_tokens), 0), COALESCE(sum(res.completion_tokens), 0)
      FROM (SELECT DISTINCT result_key, cached FROM requests
             WHERE job_id = :job_id AND state = 'done' AND result_key IS NOT NULL) a
      JOIN results res ON res.cache_key = a.result_key
     GROUP BY a.cached
    """
)
WAITERS_SQL = sa.text(
    """
    SELECT t.key, t.waiters, t.state, count(r.id) AS pending
      FROM tasks t LEFT JOIN requests r ON r.cache_key = t.key AND r.state = 'pending'
     GROUP BY t.key
    """
)


def recount(db: orm.Session, job_id: str) -> dict[str, int]:
    return dict(db.execute(RECOUNT_SQL, {"job_id": job_id}).mappings().one())


def recount_spend(db: orm.Session, job_id: str) -> dict[bool, tuple[int, int]]:
    spend = {False: (0, 0), True: (0, 0)}
    for cached, prompt, completion in db.execute(SPEND_SQL, {"job_id": job_id}):
        spend[cached] = (int(prompt), int(completion))
    return spend


def waiters_disagreeing(db: orm.Session) -> list[tuple]:
    """Tasks whose waiters differ from their pending requests, or pending with none (idle)."""
    rows = db.execute(WAITERS_SQL).all()
    return [row for row in rows if row.waiters != row.pending or (row.state == "pending" and row.pending == 0)]
