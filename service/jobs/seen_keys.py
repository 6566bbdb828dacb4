"""Which cache keys a submission may already have answered a request from, in fixed memory.

A job counts the tokens of each cached result once, however many of its requests it answers
(docs/scale.md, cached spend). Over a file of 10^7 requests written 5,000 at a time, knowing
whether an earlier batch already counted a hit took an index probe of `requests` per hit per
batch (15% of a fully cached job's creation). This Bloom filter answers "certainly not" for
nearly all of them without the database: only the keys it may have seen are probed, so a false
positive costs one probe and a miss is impossible.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BITS = 1 << 27  # 16 MiB: under 2% false positives at 10^7 keys with two probes each
_MASK = np.uint64(BITS - 1)


class SeenKeys:
    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._bits = np.zeros(BITS // 8, dtype=np.uint8)
        self.add(keys)

    def add(self, keys: Iterable[str]) -> None:
        for position in _positions(keys):
            np.bitwise_or.at(self._bits, position >> np.uint64(3), _bit(position))

    def maybe_seen(self, keys: list[str]) -> list[str]:
        """The keys that may have been added (all that were, a few that were not)."""
        if not keys:
            return []
        first, second = _positions(keys)
        present = ((self._bits[first >> np.uint64(3)] & _bit(first)) != 0) & \
                  ((self._bits[second >> np.uint64(3)] & _bit(second)) != 0)
        return [key for key, seen in zip(keys, present) if seen]


def _positions(keys: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    # Python's string hash: fixed for the life of the process, which is the filter's life (one
    # submission). Its two 32-bit halves are the two probes.
    hashes = np.fromiter((hash(key) for key in keys), dtype=np.int64).view(np.uint64)
    return hashes & _MASK, (hashes >> np.uint64(32)) & _MASK


def _bit(position: np.ndarray) -> np.ndarray:
    return np.left_shift(np.uint8(1), (position & np.uint64(7)).astype(np.uint8))
