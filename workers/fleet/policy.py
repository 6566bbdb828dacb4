"""How many replicas a teacher's pool should run, from its outstanding work, with hysteresis.

Up at once (work waiting is the expensive case: a GPU idles only as long as scaling up takes);
down only after the smaller size has been enough for `scale_down_after_s`, and to the minimum
(zero) only after no work at all for `idle_s`, so a queue that empties between two submissions
does not pay an engine load each time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ScalePolicy:
    min_replicas: int
    max_replicas: int
    requests_per_replica: int  # outstanding tasks that justify one more replica
    scale_down_after_s: float
    idle_s: float
    _below_since: float | None = None  # when the target first fell below the current size
    _idle_since: float | None = None  # when the teacher last had no outstanding work at all

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas}), "
                             "max_replicas >= 1")
        if self.requests_per_replica < 1:
            raise ValueError("requests_per_replica must be at least 1")

    def target(self, outstanding: int) -> int:
        """The size the work asks for now: at least one replica while anything is outstanding."""
        wanted = math.ceil(outstanding / self.requests_per_replica)
        return max(self.min_replicas, min(self.max_replicas, wanted))

    def desired(self, outstanding: int, current: int, now: float) -> int:
        """The size to run from `now` on, given the size running."""
        if outstanding:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        target = self.target(outstanding)
        if target >= current:
            self._below_since = None
            return target
        if self._below_since is None:
            self._below_since = now
        if outstanding == 0:
            assert self._idle_since is not None  # set above whenever nothing is outstanding
            settled = now - self._idle_since >= self.idle_s
        else:
            settled = now - self._below_since >= self.scale_down_after_s
        if not settled:
            return current
        self._below_since = None
        return target

    def cap(self) -> int:
        """How far the pending-work query needs to count: past this, the answer is `max_replicas`."""
        return self.max_replicas * self.requests_per_replica + 1
