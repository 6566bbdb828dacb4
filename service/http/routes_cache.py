"""The cache's counters, as JSON (the same figures /metrics exports for Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from service.cachekey import CACHE_KEY_VERSION
from service.http.deps import Jobs, caller

router = APIRouter(prefix="/v1/cache", tags=["cache"], dependencies=[Depends(caller)])


class CacheStats(BaseModel):
    """`entries` is the shared cache; the rest counts the caller's own tenant's requests."""

    key_version: int
    entries: int  # distinct cache keys with a stored result, from every tenant
    hits: int  # requests answered from the cache when submitted
    misses: int  # requests of cache-using jobs that had to be computed (or joined a computation in flight)
    prompt_tokens_saved: int
    completion_tokens_saved: int
    tokens_saved: int  # prompt + completion: what the teacher did not have to run again


@router.get("/stats", response_model=CacheStats)
def cache_stats(jobs: Jobs) -> CacheStats:
    return CacheStats(key_version=CACHE_KEY_VERSION, **jobs.cache_stats())
