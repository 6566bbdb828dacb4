"""Run an iterator a few items ahead of its consumer, in a thread of its own.

The loader's reading (Parquet decoding, soft-label decoding, HTTP range requests, the numpy
views of each record batch) is done by Arrow and numpy with the GIL released, and the layouts'
tensors are built in the consumer's thread; running the first ahead of the second overlaps
them, as a DataLoader worker would, without a process or a copy through shared memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()
_POLL_S = 0.1  # how often a producer blocked on a full queue looks whether the consumer left


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def read_ahead(items: Iterator[T], depth: int = 2, name: str = "teachercache-read-ahead") -> Iterator[T]:
    """Yield `items` as produced by a thread that stays at most `depth` items ahead (memory: depth
    items). An exception of `items` is raised here, where the consumer is. If the consumer stops
    early (closes this generator), the thread stops and closes `items` (its `finally` runs)."""
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    left = threading.Event()

    def hand_over(item: object) -> bool:
        while not left.is_set():
            try:
                ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(_END)
        except BaseException as error:  # handed to the consumer, raised in its thread
            hand_over(_Failure(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        left.set()
        thread.join()
