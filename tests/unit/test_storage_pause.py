"""The claim pause after a storage error: backoff doubles to its bound; a success ends it."""

from __future__ import annotations

import time

from workers.loop import StoragePause


def test_the_wait_doubles_up_to_its_bound_and_a_success_ends_the_pause():
    pause = StoragePause(backoff_s=1.0, max_s=3.0)
    assert not pause.paused and not pause.check_due() and not pause.cleared()
    assert [pause.fault() for _ in range(4)] == [1.0, 2.0, 3.0, 3.0]
    assert pause.paused and not pause.check_due()  # the next check is 3 s away
    assert pause.cleared() and not pause.paused
    assert pause.fault() == 1.0  # a new fault starts from the first wait again


def test_a_check_is_due_once_the_wait_has_passed():
    pause = StoragePause(backoff_s=0.05, max_s=1.0)
    pause.fault()
    time.sleep(0.06)
    assert pause.check_due()
