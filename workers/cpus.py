"""Keep the service's own threads off the cores the engine computes on (vLLM's CPU build).

vLLM's CPU build binds the OpenMP threads of its model worker to some cores and leaves others
"reserved" (`VLLM_CPU_NUM_OF_RESERVED_CPU`) for its scheduler and frontend. The threads of this
process that are not vLLM's (claimer, writer, heartbeat, finalizer, and in a benchmark the API)
are otherwise free to run on the compute cores and preempt the model mid-step. Pinning them to
the reserved cores costs them nothing (their work is small and mostly waits on I/O) and leaves
the compute cores to the model. New threads inherit the pinning of the thread that starts them.
"""

from __future__ import annotations

import contextlib
import logging
import os

import psutil

log = logging.getLogger(__name__)


def engine_compute_cpus(all_cpus: set[int]) -> set[int]:
    """The cores that threads of this process's children are bound to (a narrower set than all)."""
    bound: set[int] = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            for thread in child.threads():
                with contextlib.suppress(OSError):
                    cpus = os.sched_getaffinity(thread.id)
                    if cpus != all_cpus:
                        bound |= cpus
    return bound


def keep_off_engine_cpus() -> set[int] | None:
    """Pin every thread of this process to the cores the engine does not compute on; the cores
    pinned to, or None when there is nothing to do (no binding, or no core left over)."""
    all_cpus = os.sched_getaffinity(0)
    compute = engine_compute_cpus(all_cpus)
    spare = all_cpus - compute
    if not compute or not spare:
        return None
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), spare)
    log.info("the engine computes on cores %s; this process's threads run on %s", sorted(compute), sorted(spare))
    return spare
