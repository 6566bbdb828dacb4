"""The job states the client reads, as the service's API documents them.

The client may not import the service (a student machine installs neither it nor a database
driver), so this is the client's own definition of the public states; `tests/unit/test_states.py`
checks that it agrees with `service/states.py`.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINALIZING = "finalizing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Once a job is in one of these it never changes again.
FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# Finished without all of its results: wait(raise_on_failure=True) raises JobFailed.
UNSUCCESSFUL = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})
