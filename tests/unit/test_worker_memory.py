"""A CPU engine's KV cache when nobody says: a quarter of the free memory, at most 4 GiB, and
a one-line refusal naming the setting when it cannot fit."""

from __future__ import annotations

import pytest

from workers.memory import GIB, EngineStartFailed, check_fits, default_cpu_kv_cache_gb


@pytest.mark.parametrize("free_gib, expected", [(12.86, 3.21), (64, 4.0), (2, 0.5)])
def test_the_default_is_a_quarter_of_the_free_memory_at_most_4_gib(free_gib, expected):
    assert default_cpu_kv_cache_gb(int(free_gib * GIB)) == pytest.approx(expected, abs=0.01)


def test_too_little_free_memory_is_refused_naming_the_setting():
    with pytest.raises(EngineStartFailed, match="TEACHERCACHE_KV_CACHE_GB"):
        default_cpu_kv_cache_gb(int(0.5 * GIB))


def test_a_configured_size_must_fit_what_is_free():
    check_fits(2.0, 3 * GIB)
    with pytest.raises(EngineStartFailed) as caught:
        check_fits(100, 12 * GIB)
    assert "TEACHERCACHE_KV_CACHE_GB=100 does not fit the 12.00 GiB" in str(caught.value)
    assert "\n" not in str(caught.value) and "for example 3" in str(caught.value)
