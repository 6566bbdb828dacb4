"""Prometheus metrics, read from Postgres at scrape time so every API replica agrees.

A scrape reads maintained counters (the jobs' rows: a row per job, never per request), bounded
index-only counts (tasks pending, cache entries: exact up to 10,000, then the index size
Postgres last measured), the in-flight leases and the workers table, which is pruned."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import orm

from service.jobs.repository import JobRepository
from service.jobs.spend import NO_PRICES, Prices, cost_usd, teacher_tokens
from service.queue.repository import TaskRepository
from service.queue.workers import WorkerRepository
from service.results.repository import ResultRepository
from service.states import RequestState

QUEUE_HEAD_CAP = 10_000  # tasks at the head of a teacher's queue a scrape reads, at most

# What a remote engine's stats count beyond the local ones (workers/remote_adapter.py).
REMOTE_COUNTERS = {
    "http_requests": "HTTP requests sent to the remote teacher (retries included)",
    "http_retries": "HTTP requests to the remote teacher that were retried",
    "http_rate_limited": "429 answers from the remote teacher",
    "budget_wait_ms": "milliseconds requests waited on the remote teacher's budget",
}


class DatabaseCollector:
    def __init__(self, session: orm.Session, prices: Callable[[str], Prices] = lambda teacher: NO_PRICES) -> None:
        self.jobs = JobRepository(session)
        self.tasks = TaskRepository(session)
        self.results = ResultRepository(session)
        self.workers = WorkerRepository(session)
        self.prices = prices

    def collect(self) -> Iterator[Metric]:
        for table, counts in self.jobs.state_counts().items():
            family = GaugeMetricFamily(f"teachercache_{table}", f"{table} by state", labels=["state"])
            for state, n in sorted(counts.items()):
                family.add_metric([state], n)
            yield family
        yield from self._work()
        yield from self._cache()
        yield from self._engine()
        yield from self._spend()
        yield from self._remote()
        yield from self._storage()

    def _work(self) -> Iterator[Metric]:
        """Per teacher, what waits for it; requests that ended, by outcome; the finalizer's lag."""
        pending = self.jobs.pending_by_teacher()  # read once per scrape: the autoscaling figures use it too
        family = GaugeMetricFamily("teachercache_pending_requests", "requests waiting for the teacher",
                                   labels=["teacher"])
        for teacher, n in sorted(pending.items()):
            family.add_metric([teacher], n)
        yield family
        ended = CounterMetricFamily("teachercache_requests_ended", "requests that ended, by outcome (of the jobs "
                                    "still kept)", labels=["outcome"])
        for outcome, n in self.jobs.requests_by_state().items():
            if outcome != RequestState.PENDING:
                ended.add_metric([outcome], n)
        yield ended
        yield GaugeMetricFamily("teachercache_finalizer_lag_seconds", "how long the job that has waited longest "
                                "for its assembly has waited", value=self.jobs.finalizer_lag_s())
        yield from self._autoscaling(pending)

    def _autoscaling(self, pending: dict[str, int]) -> Iterator[Metric]:
        """What the fleet's autoscalers read per teacher (KEDA, the Ray controller): leases running,
        the pending tokens and the age of the oldest task at the head of the queue. Pending tokens
        are exact up to QUEUE_HEAD_CAP tasks; past that, the head's tokens per task times the
        teacher's pending requests (an estimate, documented in docs/scaling.md)."""
        leases = self.tasks.leases_by_teacher()
        teachers = sorted(set(pending) | set(leases))
        heads = {teacher: self.tasks.queue_head(teacher, QUEUE_HEAD_CAP) for teacher in teachers}
        family = GaugeMetricFamily("teachercache_running_leases", "tasks a worker holds now", labels=["teacher"])
        for teacher in teachers:
            family.add_metric([teacher], leases.get(teacher, 0))
        yield family
        family = GaugeMetricFamily("teachercache_pending_tokens", "teacher tokens the pending work can cost "
                                   "(prompts + max_tokens x n)", labels=["teacher"])
        for teacher, head in heads.items():
            exact = head.tasks < QUEUE_HEAD_CAP
            per_task = head.tokens / head.tasks if head.tasks else 0.0
            family.add_metric([teacher], head.tokens if exact else per_task * pending.get(teacher, head.tasks))
        yield family
        family = GaugeMetricFamily("teachercache_oldest_pending_age_seconds", "how long the oldest task at the head "
                                   "of the queue has waited", labels=["teacher"])
        for teacher, head in heads.items():
            family.add_metric([teacher], head.oldest_age_s)
        yield family

    def _cache(self) -> Iterator[Metric]:
        stats = self.results.cache_stats()
        yield GaugeMetricFamily("teachercache_cache_entries", "cached results", value=stats["entries"])
        yield CounterMetricFamily("teachercache_cache_hits", "requests answered from the cache", value=stats["hits"])
        yield CounterMetricFamily("teachercache_cache_misses", "requests that looked in the cache and were not in it",
                                  value=stats["misses"])
        for kind in ("prompt", "completion"):
            yield CounterMetricFamily(f"teachercache_cache_{kind}_tokens_saved",
                                      f"{kind} tokens served from the cache instead of the teacher",
                                      value=stats[f"{kind}_tokens_saved"])

    def _engine(self) -> Iterator[Metric]:
        totals = self.workers.engine_totals()
        for name in ("requests", "prompt_tokens", "completion_tokens"):
            yield CounterMetricFamily(f"teachercache_engine_{name}", f"{name} the teacher engines actually ran",
                                      value=totals.get(name, 0))
        online = self.workers.online()
        family = GaugeMetricFamily("teachercache_workers_online", "workers seen in the last minute", labels=["teacher"])
        for teacher, n in sorted(online.items()):
            family.add_metric([teacher], n)
        yield family


    def _spend(self) -> Iterator[Metric]:
        """Per teacher, the sum of its jobs' spend (see service/jobs/spend.py)."""
        tokens: dict[tuple[str, str, str], int] = {}
        for teacher, mode, cached, prompt, completion in self.jobs.spend_tokens_by_teacher():
            where = "cached" if cached else "sent"
            for kind, n in zip(("prompt", "completion"), teacher_tokens(mode, prompt, completion)):
                tokens[(teacher, where, kind)] = tokens.get((teacher, where, kind), 0) + n
        for where, help_text in (("sent", "tokens sent to the teacher for jobs"),
                                 ("cached", "tokens answered from the cache instead of the teacher")):
            family = CounterMetricFamily(f"teachercache_teacher_tokens_{where}", help_text, labels=["teacher", "kind"])
            for (teacher, w, kind), n in sorted(tokens.items()):
                if w == where:
                    family.add_metric([teacher, kind], n)
            yield family
        for where, name in (("sent", "spent"), ("cached", "saved")):
            family = CounterMetricFamily(f"teachercache_teacher_{name}_usd",
                                         f"USD {name} on priced teachers (registry prices)", labels=["teacher"])
            for teacher in sorted({t for t, _, _ in tokens}):
                usd = cost_usd(tokens.get((teacher, where, "prompt"), 0), tokens.get((teacher, where, "completion"), 0),
                               self.prices(teacher))
                if usd is not None:
                    family.add_metric([teacher], usd)
            yield family

    def _remote(self) -> Iterator[Metric]:
        totals = self.workers.engine_totals_by_teacher()
        for name, help_text in REMOTE_COUNTERS.items():
            family = CounterMetricFamily(f"teachercache_remote_{name}", help_text, labels=["teacher"])
            for teacher, stats in sorted(totals.items()):
                if name in stats:
                    family.add_metric([teacher], stats[name])
            yield family

    def _storage(self) -> Iterator[Metric]:
        """Storage writes workers gave up on (each released its tasks and paused claiming), and
        failed checks while paused: a full disk or an unreachable bucket shows here, not as failures."""
        family = CounterMetricFamily("teachercache_storage_errors", "result shard writes and writability checks "
                                     "that storage refused after retries", labels=["teacher"])
        for teacher, stats in sorted(self.workers.engine_totals_by_teacher().items()):
            family.add_metric([teacher], stats.get("storage_errors", 0))
        yield family


def render_metrics(session: orm.Session, prices: Callable[[str], Prices] = lambda teacher: NO_PRICES) -> bytes:
    """The Prometheus text of one scrape, read in `session` (the handler's transaction)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session, prices))
    return generate_latest(registry)
