"""A remote teacher's spending limits: requests and tokens per minute, shared by all of a
worker's HTTP threads, plus a pause every thread honours after the server says 429.

Token buckets: each holds at most one second's worth of its rate (at least one), so a worker
starts gently instead of spending a whole minute's budget in its first second; it refills
continuously at rate / 60 per second. Over any interval of t seconds a bucket lets through at
most capacity + rate * t (plus one request's overshoot, paid back before the next is sent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, per_minute: float, capacity: float | None = None, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0:
            raise ValueError("a budget must be positive")
        self.rate = per_minute / 60.0
        self.capacity = capacity if capacity is not None else max(1.0, self.rate)
        self.level = self.capacity
        self.clock = clock
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` may be spent (0 when it may be now)."""
        self._refill()
        # A request bigger than the bucket waits for a full bucket rather than forever; it
        # then leaves the bucket in debt, so the long-run rate still holds.
        return max(0.0, (min(amount, self.capacity) - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class Budget:
    """Blocks each request until both buckets allow it and no 429 pause is running."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.requests = TokenBucket(requests_per_minute, clock=clock) if requests_per_minute else None
        self.tokens = (TokenBucket(tokens_per_minute, capacity=max(1.0, tokens_per_minute / 60.0), clock=clock)
                       if tokens_per_minute else None)
        self.clock = clock
        self.sleep = sleep
        self.paused_until = 0.0
        self.waited_s = 0.0  # total time requests spent waiting on the budget (a stat)
        self._lock = threading.Lock()

    def acquire(self, tokens: int) -> None:
        """Wait until one request of `tokens` tokens may be sent, then spend it."""
        while True:
            with self._lock:
                wait = self._wait(tokens)
                if wait <= 0:
                    for bucket, amount in ((self.requests, 1), (self.tokens, tokens)):
                        if bucket is not None:
                            bucket.take(amount)
                    return
                self.waited_s += wait
            self.sleep(wait)

    def pause(self, seconds: float) -> None:
        """The server asked us to slow down: nobody sends for `seconds`."""
        with self._lock:
            self.paused_until = max(self.paused_until, self.clock() + seconds)

    def _wait(self, tokens: int) -> float:
        waits = [self.paused_until - self.clock()]
        if self.requests is not None:
            waits.append(self.requests.wait_for(1))
        if self.tokens is not None:
            waits.append(self.tokens.wait_for(tokens))
        return max(waits)
