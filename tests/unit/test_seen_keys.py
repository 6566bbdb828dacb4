"""The filter of a file job's earlier cache hits: never misses a key it was given, rarely claims
one it was not, and stays its fixed size however many keys it holds."""

from __future__ import annotations

import hashlib

from service.jobs.seen_keys import BITS, SeenKeys


def keys(start: int, stop: int) -> list[str]:
    return [f"k2-{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(start, stop)]


def test_every_key_added_is_reported_and_few_others_are():
    seen = SeenKeys(keys(0, 5_000))
    for start in range(5_000, 100_000, 5_000):
        seen.add(keys(start, start + 5_000))
    given = keys(0, 100_000)
    assert seen.maybe_seen(given) == given  # no false negative: a miss would double-count spend
    others = keys(100_000, 200_000)
    assert len(seen.maybe_seen(others)) < 0.01 * len(others)
    assert seen._bits.nbytes == BITS // 8


def test_an_empty_filter_has_seen_nothing_and_repeats_are_found():
    seen = SeenKeys()
    assert seen.maybe_seen(keys(0, 1_000)) == [] and seen.maybe_seen([]) == []
    seen.add(["bypass-job-1", "bypass-job-1"])
    assert seen.maybe_seen(["bypass-job-1", "bypass-job-2"])[:1] == ["bypass-job-1"]
