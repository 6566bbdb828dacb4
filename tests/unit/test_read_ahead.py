"""teachercache/_read_ahead.py: the loader's reading runs a few items ahead in a thread; the
consumer sees the same items in the same order, the producer's errors, and a producer that
stops (and cleans up) when the consumer does."""

from __future__ import annotations

import threading
import time

import pytest

from teachercache._read_ahead import read_ahead


def test_the_items_come_in_order_and_all():
    assert list(read_ahead(iter(range(1000)), depth=3)) == list(range(1000))


def test_the_producer_stays_at_most_depth_items_ahead():
    produced: list[int] = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    ahead = read_ahead(items(), depth=2)
    assert next(ahead) == 0
    time.sleep(0.3)  # room for the producer to run as far ahead as it may
    # 0 consumed, 2 waiting in the queue, 1 made and blocked on handing it over
    assert len(produced) <= 1 + 2 + 1
    ahead.close()


def test_an_error_of_the_items_is_raised_to_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise KeyError("shard 3 is gone")

    seen = []
    with pytest.raises(KeyError, match="shard 3 is gone"):
        for item in read_ahead(items()):
            seen.append(item)
    assert seen == [1, 2]


def test_a_consumer_that_stops_early_stops_the_producer_and_runs_its_cleanup():
    closed = threading.Event()

    def items():
        try:
            yield from range(10**9)
        finally:
            closed.set()

    ahead = read_ahead(items(), depth=2, name="test-read-ahead")
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    ahead.close()
    assert closed.is_set()
    assert not any(t.name == "test-read-ahead" for t in threading.enumerate())
