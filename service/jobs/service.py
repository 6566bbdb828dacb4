"""Job operations. Services never commit: the request handler or worker loop does."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from service.cachekey import cache_key, normalize_sampling, teacher_identity
from service.errors import Conflict, NotFound, ValidationFailed
from service.ids import new_id
from service.jobs.limits import JobLimits, check_pending, check_shape, check_text_lengths, check_tokens
from service.jobs.repository import JobRepository
from service.jobs.schemas import Counts, JobCreate, JobOut, RequestError, ShardOut
from service.jobs.spend import NO_PRICES, Prices, SpendTokens, job_spend
from service.jobs.tokenize import PreparedRequest, prepare_requests
from service.models import Job
from service.queue.repository import NewTask, TaskRepository
from service.results.repository import ResultRepository
from service.teachers.tokenizer import Teacher

MAX_ATTEMPTS = 3
ShardUrl = Callable[[str], str]


def body_sha256(body: JobCreate) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


def check_parameters(body: JobCreate, teacher: Teacher, limits: JobLimits) -> None:
    check_shape(body, limits)
    limit = teacher.spec.max_top_logprobs
    if body.top_logprobs > limit:
        raise ValidationFailed(f"top_logprobs: {body.top_logprobs} is above this teacher's maximum of {limit}",
                               field="top_logprobs")
    if body.mode == "score" and body.sampling.n != 1:
        raise ValidationFailed("sampling.n: score mode is teacher-forced and takes n = 1", field="sampling.n")


def prepare_submission(body: JobCreate, teacher: Teacher, limits: JobLimits) -> list:
    """Validate and tokenize a job; no database. The HTTP layer runs it before it takes a pooled
    connection, so a connection is never held while a tokenizer works."""
    check_parameters(body, teacher, limits)
    check_text_lengths(body, limits)
    prepared = prepare_requests(body, teacher)
    check_tokens(body, prepared, limits)
    return prepared


class JobService:
    """A tenant's jobs: every lookup is scoped to `tenant`; another tenant's job is not found."""

    def __init__(self, session: orm.Session, tenant: str, limits: JobLimits | None = None,
                 prices: Callable[[str], Prices] = lambda teacher: NO_PRICES) -> None:
        self.jobs = JobRepository(session)
        self.results = ResultRepository(session)
        self.tasks = TaskRepository(session)
        self.tenant = tenant
        self.limits = limits or JobLimits.defaults()
        self.prices = prices  # a teacher's prices, for the money side of a job's spend

    def find_retry(self, idempotency_key: str | None, body: JobCreate) -> Job | None:
        """The job a retried submission (same Idempotency-Key) already created."""
        if idempotency_key is None:
            return None
        if not self.jobs.lock_idempotency_key(self.tenant, idempotency_key):
            raise Conflict("a submission with this Idempotency-Key is still being written; retry shortly",
                           field="Idempotency-Key")
        job = self.jobs.by_idempotency_key(self.tenant, idempotency_key)
        if job is not None and job.body_sha256 != body_sha256(body):
            raise ValidationFailed("Idempotency-Key was already used with a different body",
                                   field="Idempotency-Key")
        return job

    def submit(self, body: JobCreate, teacher: Teacher, idempotency_key: str | None = None,
               before_write: Callable[[], None] = lambda: None, prepared: list | None = None) -> Job:
        """Validate and tokenize (unless `prepared` already is), then (`before_write`: the rate-limit
        spend, so an invalid body spends nothing) write the whole job."""
        if prepared is None:
            prepared = prepare_submission(body, teacher, self.limits)
        before_write()
        sampling = normalize_sampling(body.mode, body.sampling.model_dump())
        identity = teacher_identity(teacher.spec.model or teacher.name, teacher.revision, teacher.tokenizer_hash,
                                    teacher.spec.dtype)
        keys = [cache_key(identity, body.mode, r.prompt_token_ids, r.response_token_ids, sampling, body.top_logprobs)
                for r in prepared]
        job = self._add_job(body, teacher, idempotency_key, len(prepared))
        if body.cache == "bypass":
            keys = [f"bypass-{job.id}-{i}" for i in range(len(keys))]  # never shared, never found
        hits = self.results.results_for(keys) if body.cache == "use" else {}
        misses = sum(k not in hits for k in keys)
        self._check_pending(misses)
        count_submission(job, hits, misses)
        self.jobs.session.flush()  # before any statement adjusts the counters in the database
        self.jobs.add_requests([request_row(job.id, r, k, k in hits) for r, k in zip(prepared, keys)])
        finished_meanwhile = self._enqueue_misses(body, teacher, prepared, keys, hits, sampling)
        # A task that finished while this job was being written (its result was not committed
        # when we looked): answer from it now, so nothing waits on a task that will not run.
        self.results.resolve_requests(finished_meanwhile)
        self.jobs.session.refresh(job)  # the counters, as the statements above left them
        return job

    def _check_pending(self, new: int) -> None:
        # Serialise the tenant's submissions for this transaction, so two cannot both pass.
        self.jobs.lock_tenant_submissions(self.tenant)
        check_pending(self.tenant, self.jobs.pending_requests(self.tenant), new, self.limits)

    def _add_job(self, body: JobCreate, teacher: Teacher, idempotency_key: str | None, total: int) -> Job:
        job = Job(
            id=new_id("job"), tenant=self.tenant, status="queued", teacher=teacher.name, mode=body.mode,
            top_logprobs=body.top_logprobs, sampling=body.sampling.model_dump(), cache_policy=body.cache,
            metadata_=body.metadata, total=total, idempotency_key=idempotency_key, body_sha256=body_sha256(body),
        )
        self.jobs.add_job(job)
        return job

    def _enqueue_misses(self, body, teacher, prepared, keys, hits, sampling) -> list[str]:
        """Queue (or join) a task per missed key, each waited on by this job's requests with that
        key; the keys whose task was already done."""
        tasks: dict[str, NewTask] = {}
        waiters: dict[str, int] = {}
        for request, key in zip(prepared, keys):
            if key in hits:
                continue
            waiters[key] = waiters.get(key, 0) + 1
            if key not in tasks:
                tasks[key] = NewTask(
                    key=key, teacher=teacher.name, mode=body.mode, prompt_token_ids=request.prompt_token_ids,
                    response_token_ids=request.response_token_ids, sampling=sampling,
                    top_logprobs=body.top_logprobs, max_attempts=MAX_ATTEMPTS, messages=request.messages,
                )
        return self.tasks.enqueue(list(tasks.values()), waiters, recompute_done=body.cache == "refresh")

    def get(self, job_id: str, lock: bool = False) -> Job:
        job = self.jobs.owned(job_id, self.tenant, lock=lock)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return job

    def page(self, limit: int, after: str | None) -> tuple[list[Job], bool]:
        """Newest first; `after` is the last job id of the previous page."""
        before = None
        if after:
            cursor = self.get(after)
            before = (cursor.created_at, cursor.id)
        jobs = self.jobs.list(self.tenant, limit + 1, before)
        return jobs[:limit], len(jobs) > limit

    def delete(self, job_id: str) -> list[str]:
        """Remove a finished job: its rows, its requests and its shard index (never the cache: the
        results it was answered from stay for other jobs). The storage paths of its shards, for
        the caller to remove once this transaction has committed (a crash in between leaves only
        unreferenced objects, never an index row pointing at nothing)."""
        job = self.get(job_id, lock=True)
        if job.status not in ("succeeded", "failed", "cancelled"):
            raise Conflict(f"job {job_id} is {job.status}; cancel it and wait for it to end before deleting it")
        paths = [shard.path for shard in self.jobs.job_shards(job_id)]
        self.jobs.delete_job(job_id)
        return paths

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id, lock=True)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        if job.status == "finalizing":
            if job.cancel_requested_at is not None:
                return job
            raise Conflict(f"job {job_id} is already finalizing; nothing is left to cancel")
        # Assembled with what was completed; the finalizer then ends it `cancelled`.
        self.jobs.cancel(job_id)
        self.jobs.session.refresh(job)
        return job

    def errors(self, job_id: str, limit: int, after: int = -1) -> tuple[list[RequestError], bool]:
        """A page of the failed requests, and whether more follow."""
        self.get(job_id)
        rows = self.jobs.failed_requests(job_id, limit + 1, after)
        errors = [RequestError(request_index=r.request_index, custom_id=r.custom_id, error=r.error or r.state)
                  for r in rows[:limit]]
        return errors, len(rows) > limit

    def shards(self, job_id: str, shard_url: ShardUrl) -> list[ShardOut]:
        self.get(job_id)
        return [shard_out(s, shard_url) for s in self.jobs.job_shards(job_id)]

    def describe(self, job: Job, shard_url: ShardUrl) -> JobOut:
        finished = job.finished_at is not None
        return JobOut(
            id=job.id, status=job.status, teacher=job.teacher, mode=job.mode, top_logprobs=job.top_logprobs,
            sampling=job.sampling, cache=job.cache_policy, metadata=job.metadata_,
            counts=job_counts(job),
            spend=job_spend(job.mode, spend_tokens(job), self.prices(job.teacher)),
            created_at=iso(job.created_at),
            started_at=iso(job.started_at), finished_at=iso(job.finished_at), error=job.error,
            shards=[shard_out(s, shard_url) for s in self.jobs.job_shards(job.id)] if finished else None,
        )


def count_submission(job: Job, hits: dict[str, tuple[int, int]], misses: int) -> None:
    """The new job's counters: its hits answered, its misses pending, the distinct hit results'
    tokens as its cached spend; answered wholly from the cache, it is ready at once."""
    job.n_pending, job.n_cached = misses, job.total - misses
    job.cached_prompt_tokens = sum(p for p, _ in hits.values())
    job.cached_completion_tokens = sum(c for _, c in hits.values())
    if misses == 0:
        job.status, job.started_at, job.ready_at = "finalizing", sa.func.now(), sa.func.now()


def job_counts(job: Job) -> Counts:
    """The job's maintained counters (never a recount of its requests)."""
    return Counts(total=job.total, completed=job.n_completed, cached=job.n_cached, failed=job.n_failed,
                  pending=job.n_pending, cancelled=job.n_cancelled)


def spend_tokens(job: Job) -> SpendTokens:
    return {False: (job.sent_prompt_tokens, job.sent_completion_tokens),
            True: (job.cached_prompt_tokens, job.cached_completion_tokens)}


def request_row(job_id: str, request: PreparedRequest, key: str, hit: bool) -> dict[str, Any]:
    return {
        "job_id": job_id, "request_index": request.index, "custom_id": request.custom_id, "cache_key": key,
        "state": "done" if hit else "pending", "cached": hit, "result_key": key if hit else None,
        "prompt_tokens": len(request.prompt_token_ids),
    }


def shard_out(shard, shard_url: ShardUrl) -> ShardOut:
    return ShardOut(index=shard.shard_index, url=shard_url(shard.id), rows=shard.rows, bytes=shard.bytes,
                    sha256=shard.sha256)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
