"""The cache's counters, as JSON (the same figures /metrics exports for Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from service.cachekey import CACHE_KEY_VERSION
from service.http.deps import Db, Who, caller
from service.results.repository import ResultRepository

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
def cache_stats(db: Db, who: Who) -> CacheStats:
    stats = ResultRepository(db).cache_stats(who.tenant)
    saved = stats["prompt_tokens_saved"] + stats["completion_tokens_saved"]
    return CacheStats(key_version=CACHE_KEY_VERSION, tokens_saved=saved, **stats)
