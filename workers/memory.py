"""How much memory a CPU engine's KV cache takes when nobody says.

vLLM's CPU build otherwise reserves `gpu_memory_utilization` (0.92) of the NUMA node's memory
and refuses to start when that much is not free, which it never is on a small machine that
also runs Postgres and the API. A worker started with no engine settings takes a quarter of
the memory that is free, at most 4 GiB (plenty for a small teacher; more only lengthens the
queue vLLM can hold), and says in one line what to set when even that does not fit.
"""

from __future__ import annotations

import psutil

GIB = 1 << 30
FREE_FRACTION = 0.25
MAX_DEFAULT_GB = 4.0
MIN_GB = 0.25
SETTING = "TEACHERCACHE_KV_CACHE_GB"


class EngineStartFailed(Exception):
    """The engine cannot start here; the message says why and what to change, in one line."""


def free_bytes() -> int:
    return int(psutil.virtual_memory().available)


def default_cpu_kv_cache_gb(available: int) -> float:
    gb = min(MAX_DEFAULT_GB, available * FREE_FRACTION / GIB)
    if gb < MIN_GB:
        raise EngineStartFailed(f"only {available / GIB:.2f} GiB of memory is free, too little for the engine's "
                                f"KV cache; free some memory or set {SETTING} (GiB) explicitly")
    return round(gb, 2)


def check_fits(kv_cache_gb: float, available: int) -> None:
    if kv_cache_gb * GIB > available:
        raise EngineStartFailed(f"{SETTING}={kv_cache_gb:g} does not fit the {available / GIB:.2f} GiB of memory "
                                f"free on this machine; set {SETTING} lower (for example "
                                f"{max(MIN_GB, min(MAX_DEFAULT_GB, round(available * FREE_FRACTION / GIB, 2))):g})")
