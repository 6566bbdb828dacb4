"""The states of jobs, requests, tasks and batches: one definition each.

The columns hold these values as text, guarded by CHECK constraints built from these enums
(migration 0013), so adding a state is one edit here plus a migration that rebuilds its
constraint. SQL built in Python binds the members; literal SQL text interpolates the member
(`f"... = '{TaskState.LEASED}'"`) or a list from `sql_list`, so no state name is typed twice.

The client (`teachercache/_states.py`) keeps its own copy of the public job states, since it
may not import the service; `tests/unit/test_states.py` checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

import sqlalchemy as sa


class JobStatus(StrEnum):
    """queued -> running -> finalizing -> succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    FINALIZING = "finalizing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Internal: a deleted or expired job too large for one transaction, hidden (a 404, never
    # listed) while the retention sweep deletes its requests in chunks.
    DELETING = "deleting"


class RequestState(StrEnum):
    """pending -> done | failed | cancelled (a cache eviction may put done back to pending)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskState(StrEnum):
    """pending -> leased -> done | failed; leased -> pending when released; pending -> idle when
    no request waits on it any more (its jobs cancelled or expired), idle -> pending when one does."""

    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"
    IDLE = "idle"


class BatchStatus(StrEnum):
    """OpenAI's: validating -> in_progress -> finalizing -> completed | failed | expired,
    or cancelling -> cancelled."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


# A job still taking work (its requests can be claimed, cancel stops them).
JOB_ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
# A job whose shards are not final yet: its results may still be read (and never evicted).
JOB_UNFINISHED = (*JOB_ACTIVE, JobStatus.FINALIZING)
JOB_FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
JOB_HIDDEN = (JobStatus.DELETING,)  # never answered: not part of the API's (or the client's) states
BATCH_FINISHED = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED)


def sql_list(states: Iterable[StrEnum]) -> str:
    """`'a', 'b'`: states for an `IN (...)` in literal SQL text (the values are identifiers, never input)."""
    return ", ".join(f"'{state.value}'" for state in states)


def check_in(column: str, states: type[StrEnum]) -> sa.CheckConstraint:
    """The CHECK constraint that keeps `column` to the enum's values (named `ck_<table>_<column>`)."""
    return sa.CheckConstraint(f"{column} IN ({sql_list(states)})", name=column)
