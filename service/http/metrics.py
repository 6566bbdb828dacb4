"""Prometheus metrics, read from Postgres at scrape time so every API replica agrees."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service.jobs.repository import JobRepository


class DatabaseCollector:
    def __init__(self, jobs: JobRepository) -> None:
        self.jobs = jobs

    def collect(self):
        for table, counts in self.jobs.state_counts().items():
            family = GaugeMetricFamily(f"teachercache_{table}", f"{table} by state", labels=["state"])
            for state, n in sorted(counts.items()):
                family.add_metric([state], n)
            yield family
        yield from self._cache()
        yield from self._engine()

    def _cache(self):
        stats = self.jobs.cache_stats()
        yield GaugeMetricFamily("teachercache_cache_entries", "cached results", value=stats["entries"])
        yield CounterMetricFamily("teachercache_cache_hits", "requests answered from the cache", value=stats["hits"])
        yield CounterMetricFamily("teachercache_cache_misses", "requests that looked in the cache and were not in it",
                                  value=stats["misses"])
        for kind in ("prompt", "completion"):
            yield CounterMetricFamily(f"teachercache_cache_{kind}_tokens_saved",
                                      f"{kind} tokens served from the cache instead of the teacher",
                                      value=stats[f"{kind}_tokens_saved"])

    def _engine(self):
        totals = self.jobs.engine_totals()
        for name in ("requests", "prompt_tokens", "completion_tokens"):
            yield CounterMetricFamily(f"teachercache_engine_{name}", f"{name} the teacher engines actually ran",
                                      value=totals.get(name, 0))
        online = self.jobs.online_workers()
        family = GaugeMetricFamily("teachercache_workers_online", "workers seen in the last minute", labels=["teacher"])
        for teacher, n in sorted(online.items()):
            family.add_metric([teacher], n)
        yield family


def render_metrics(jobs: JobRepository) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(jobs))
    return generate_latest(registry)
