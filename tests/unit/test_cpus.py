"""workers/cpus.py: this process's threads move off the cores a child process is bound to (as
vLLM's CPU build binds its model's OpenMP threads), and stay put when no child is bound."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from workers.cpus import keep_off_engine_cpus

ALL = os.sched_getaffinity(0)
pytestmark = pytest.mark.skipif(len(ALL) < 2, reason="needs two cores to leave one to the engine")


@pytest.fixture
def restore_affinity():
    yield
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), ALL)
        except OSError:
            pass


def bound_child(cpu: int) -> subprocess.Popen:
    code = f"import os, sys; os.sched_setaffinity(0, {{{cpu}}}); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def test_every_thread_moves_off_a_bound_childs_core_and_new_threads_follow(restore_affinity):
    engine_cpu = min(ALL)
    waiting = threading.Event()
    other = threading.Thread(target=waiting.wait)
    other.start()
    child = bound_child(engine_cpu)
    try:
        spare = keep_off_engine_cpus()
        assert spare == ALL - {engine_cpu}
        assert os.sched_getaffinity(0) == spare
        assert os.sched_getaffinity(other.native_id) == spare  # a thread started before
        seen = {}
        later = threading.Thread(target=lambda: seen.update(cpus=os.sched_getaffinity(0)))
        later.start()
        later.join()
        assert seen["cpus"] == spare  # and one started after
    finally:
        waiting.set()
        other.join()
        child.stdin.close()
        child.wait(10)


def test_nothing_moves_without_a_bound_child():
    """In a fresh process: the test session's own may hold a bound vLLM engine child."""
    code = ("import os; from workers.cpus import keep_off_engine_cpus; "
            "before = os.sched_getaffinity(0); print(keep_off_engine_cpus(), os.sched_getaffinity(0) == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.split() == ["None", "True"]
