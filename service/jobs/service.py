"""Job operations. Services never commit: the request handler or worker loop does."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from service.cachekey import cache_key, key_maker, normalize_sampling, teacher_identity
from service.errors import Conflict, NotFound, ValidationFailed
from service.ids import new_id
from service.jobs.input_file import LineNumbers, file_lines, prepared_batches, read_ahead
from service.jobs.limits import (
    JobLimits,
    check_pending,
    check_shape,
    check_text_lengths,
    check_tokens,
    request_checks,
)
from service.jobs.repository import JobRepository
from service.jobs.schemas import Counts, JobCreate, JobOut, RequestError, Sampling, ShardOut
from service.jobs.seen_keys import SeenKeys
from service.jobs.spend import NO_PRICES, Prices, SpendTokens, job_spend
from service.jobs.tokenize import Prepared, PreparedRequest, RejectedRequest, prepare_requests
from service.models import Job, Shard
from service.openai_batch.models import OpenAIFile
from service.openai_batch.repository import OpenAIBatchRepository
from service.queue.repository import NewTask, TaskRepository
from service.results.repository import ResultRepository
from service.sampling import with_draws
from service.states import JOB_FINISHED, JobStatus, RequestState
from service.storage.port import Storage
from service.teachers.tokenizer import Teacher
from service.tenants.service import TenantService

MAX_ATTEMPTS = 3
ShardUrl = Callable[[str], str]


def body_sha256(body: JobCreate, source: OpenAIFile | None = None) -> str:
    """The submission's fingerprint, which a retry with its Idempotency-Key must match. A job from a
    file is fingerprinted by the file's content, so the same file uploaded again is the same job."""
    # A top-k job's soft_labels hash as they did before sampled labels existed (a retry across the upgrade matches).
    added: dict[str, Any] = {} if body.soft_labels.kind == "sampled" else {
        "soft_labels": {"kind", "draws", "temperature", "seed"}}
    if source is None:  # without input_file_id: a body's hash is what it was before the field existed
        return hashlib.sha256(body.model_dump_json(exclude={"input_file_id": True, **added}).encode()).hexdigest()
    content = f"sha256:{source.sha256}" if source.sha256 else source.id
    copy = body.model_copy(update={"input_file_id": content})
    return hashlib.sha256(copy.model_dump_json(exclude=added or None).encode()).hexdigest()


def check_parameters(body: JobCreate, teacher: Teacher, limits: JobLimits) -> None:
    """The job's defaults (each request's own parameters are checked with the request)."""
    check_shape(body, limits)
    limit = teacher.spec.max_top_logprobs
    if body.top_logprobs > limit:
        raise ValidationFailed(f"top_logprobs: {body.top_logprobs} is above this teacher's maximum of {limit}",
                               field="top_logprobs")
    if body.soft_labels.kind == "sampled" and teacher.spec.is_remote:
        raise ValidationFailed(f"soft_labels.kind: teacher {teacher.name!r} is a remote endpoint, which cannot draw "
                               "from its full distribution; use kind 'topk' or a teacher served by a worker's vLLM",
                               field="soft_labels.kind")
    if body.mode == "score" and body.sampling.n != 1:
        raise ValidationFailed("sampling.n: score mode is teacher-forced and takes n = 1", field="sampling.n")


def check_one_source(body: JobCreate) -> None:
    if (body.requests is None) == (body.input_file_id is None):
        raise ValidationFailed("requests: give exactly one of requests (the requests themselves) or input_file_id "
                               "(an uploaded JSONL file, one request per line)", field="requests")


def prepare_submission(body: JobCreate, teacher: Teacher, limits: JobLimits,
                       reject_alone: bool = False) -> list[Prepared]:
    """Validate and tokenize a job; no database. The HTTP layer runs it before it takes a pooled
    connection, so a connection is never held while a tokenizer works. With `reject_alone` a
    request that cannot run fails alone (an OpenAI batch line) instead of refusing the job."""
    check_parameters(body, teacher, limits)
    if not reject_alone:  # every text first: one over the bound refuses the job before any tokenizing
        check_text_lengths(body, limits)
    prepared = prepare_requests(body, teacher, request_checks(body, limits), reject_alone)
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
        if job is not None and job.body_sha256 != self._fingerprint(body):
            raise ValidationFailed("Idempotency-Key was already used with a different body",
                                   field="Idempotency-Key")
        return job

    def submit(self, body: JobCreate, teacher: Teacher, idempotency_key: str | None = None,
               prepared: list[Prepared] | None = None, notes: dict[int, dict[str, Any]] | None = None,
               interactive: bool = False) -> Job:
        """Validate and tokenize (unless `prepared` already is), spend one of the tenant's
        submissions (after validation, so an invalid body spends nothing; in this transaction, so
        a refused one spends nothing either), then write the whole job. Every submission, a
        native job or an OpenAI batch's, is rate-limited here and nowhere else. `notes` (by
        request index) join a request's recorded parameters (the OpenAI layer notes a line's own
        `logprobs`). `interactive` puts its tasks in the interactive lane (the synchronous
        endpoints, whose caller waits: service/online)."""
        if prepared is None:
            prepared = prepare_submission(body, teacher, self.limits)
        self._spend_submission()
        job = self._add_job(body, teacher, idempotency_key, len(prepared), interactive=interactive)
        writer = JobWriter(self, job, body, teacher, notes, interactive)
        writer.write(writer.keyed(prepared))
        writer.finish()
        return job

    def _spend_submission(self) -> None:
        """One of the tenant's submissions, after validation (an invalid body spends nothing) and
        in the submission's transaction (a refused one spends nothing either)."""
        TenantService(self.jobs.session).spend_submission(self.tenant, self.limits)

    def submit_file(self, body: JobCreate, teacher: Teacher, storage: Storage,
                    idempotency_key: str | None = None) -> Job:
        """A job whose requests are the lines of an uploaded file (`input_file_id`), read, tokenized
        and written a batch at a time in this one transaction: a refused line rolls all of it back
        (the caller's transaction), so nothing is left of it, the rate-limit spend included."""
        check_parameters(body, teacher, self.limits)
        assert body.input_file_id is not None  # check_one_source: a job without its requests names a file
        source = self._input_file(body.input_file_id)
        job = self._add_job(body, teacher, idempotency_key, total=0, source=source)
        writer = JobWriter(self, job, body, teacher)
        numbers = LineNumbers()
        with storage.open(source.path) as stream:
            batches = prepared_batches(body, teacher, file_lines(stream, self.limits, numbers), self.limits)
            # Closed (its thread stopped) before the file is, whether the loop ends or raises.
            with closing(read_ahead(writer.keyed(batch) for batch in batches)) as ahead:
                for batch in ahead:
                    writer.write(batch)
        self._check_custom_ids(job.id, numbers, writer.gave_custom_ids)
        self._spend_submission()
        writer.finish()
        return job

    def _fingerprint(self, body: JobCreate) -> str:
        return body_sha256(body, self._input_file(body.input_file_id) if body.input_file_id else None)

    def _input_file(self, file_id: str) -> OpenAIFile:
        source = OpenAIBatchRepository(self.jobs.session).file(file_id, self.tenant)
        if source is None:
            raise NotFound(f"input_file_id: no file {file_id!r}", field="input_file_id")
        if source.purpose != "batch":
            raise ValidationFailed("input_file_id: the file's purpose is not 'batch'", field="input_file_id")
        return source

    def _check_custom_ids(self, job_id: str, numbers: LineNumbers, any_given: bool) -> None:
        """Two requests of a job may not share a custom_id; over a file, Postgres finds them (the
        ids of 10^7 requests are not held here). Default ids (the index) are distinct by themselves."""
        if not any_given:
            return
        duplicate = self.jobs.first_duplicate_custom_id(job_id)
        if duplicate is not None:
            index, first = duplicate
            line = numbers.of(index)
            raise ValidationFailed(f"line {line}: requests[{index}].custom_id: duplicate of requests[{first}] "
                                   f"(line {numbers.of(first)})", line=line, request_index=index,
                                   field=f"requests[{index}].custom_id")

    def _check_pending(self, new: int) -> None:
        # Serialise the tenant's submissions for this transaction, so two cannot both pass. The
        # job's own requests are written already: they are in the count, and `new` of them.
        self.jobs.lock_tenant_submissions(self.tenant)
        check_pending(self.tenant, self.jobs.pending_requests(self.tenant) - new, new, self.limits)

    def _add_job(self, body: JobCreate, teacher: Teacher, idempotency_key: str | None, total: int,
                 source: OpenAIFile | None = None, interactive: bool = False) -> Job:
        job = Job(
            id=new_id("job"), tenant=self.tenant, status=JobStatus.QUEUED, teacher=teacher.name, mode=body.mode,
            top_logprobs=body.top_logprobs, sampling=body.sampling.values(), cache_policy=body.cache,
            soft_labels=body.soft_labels.stored(), metadata_=body.metadata, total=total,
            idempotency_key=idempotency_key, body_sha256=body_sha256(body, source), interactive=interactive,
        )
        self.jobs.add_job(job)
        return job

    def get(self, job_id: str, lock: bool = False) -> Job:
        job = self.jobs.owned(job_id, self.tenant, lock=lock)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return job

    def page(self, limit: int, after: str | None, status: str | None = None) -> tuple[list[Job], bool]:
        """Newest first (only those in `status`, when given); `after` is the last job id of the
        previous page."""
        before = None
        if after:
            cursor = self.get(after)
            before = (cursor.created_at, cursor.id)
        jobs = self.jobs.list(self.tenant, limit + 1, before, status)
        return jobs[:limit], len(jobs) > limit

    def delete(self, job_id: str, rows_per_transaction: int) -> list[str]:
        """Remove a finished job: its rows, its requests and its shard index (never the cache: the
        results it was answered from stay for other jobs). The storage paths of its shards, for
        the caller to remove once this transaction has committed (a crash in between leaves only
        unreferenced objects, never an index row pointing at nothing).

        A job of more than `rows_per_transaction` requests is not deleted in this transaction:
        it is marked `deleting` (gone for its tenant at once, its shards too) and the retention
        sweep deletes its requests a chunk per transaction (`purge_deleting`), then its row."""
        job = self.get(job_id, lock=True)
        if job.status not in JOB_FINISHED:
            raise Conflict(f"job {job_id} is {job.status}; cancel it and wait for it to end before deleting it")
        paths = [shard.path for shard in self.jobs.job_shards(job_id)]
        if job.total <= rows_per_transaction:
            self.jobs.delete_job(job_id)
        else:
            self.jobs.mark_deleting(job_id)
        return paths

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id, lock=True)
        if job.status in JOB_FINISHED:
            return job
        if job.status == JobStatus.FINALIZING:
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

    def shard(self, shard_id: str) -> Shard:
        """One of the tenant's job output shards (result shards and other tenants' are not found)."""
        shard = self.jobs.job_shard(shard_id, self.tenant)
        if shard is None:
            raise NotFound(f"no shard {shard_id!r}", field="shard_id")
        return shard

    def cache_stats(self) -> dict[str, int]:
        """The shared cache's entries; the tenant's own hits, misses and tokens saved."""
        stats = self.results.cache_stats(self.tenant)
        return {**stats, "tokens_saved": stats["prompt_tokens_saved"] + stats["completion_tokens_saved"]}

    def stored_shards(self, job_id: str) -> list[Shard]:
        """The output shards of a job the caller already holds, in order, with their storage paths."""
        return self.jobs.job_shards(job_id)

    def shards(self, job_id: str, shard_url: ShardUrl) -> list[ShardOut]:
        self.get(job_id)
        return [shard_out(s, shard_url) for s in self.jobs.job_shards(job_id)]

    def describe(self, job: Job, shard_url: ShardUrl) -> JobOut:
        finished = job.finished_at is not None
        return JobOut(
            id=job.id, status=JobStatus(job.status), teacher=job.teacher, mode=job.mode, top_logprobs=job.top_logprobs,
            sampling=job.sampling, cache=job.cache_policy, soft_labels=job.soft_labels or {"encoding": "float32"},
            metadata=job.metadata_, counts=job_counts(job),
            spend=job_spend(job.mode, spend_tokens(job), self.prices(job.teacher)),
            created_at=job.created_at.isoformat(),
            started_at=iso(job.started_at), finished_at=iso(job.finished_at), error=job.error,
            shards=[shard_out(s, shard_url) for s in self.jobs.job_shards(job.id)] if finished else None,
        )


class JobWriter:
    """Writes a job's requests a batch at a time: each batch's cache lookup, its request rows
    (COPY), the tasks of its misses (joined, with their waiters) and the job's counters; at the
    end, the tenant's pending limit and the job's start (`finish`).

    Requests with the job's own parameters (nearly all) are keyed by one key maker built once;
    a request with its own sampling or top_logprobs is keyed on its own."""

    def __init__(self, service: JobService, job: Job, body: JobCreate, teacher: Teacher,
                 notes: dict[int, dict[str, Any]] | None = None, interactive: bool = False) -> None:
        self.service, self.job, self.body, self.teacher = service, job, body, teacher
        self.interactive = interactive
        self.notes = notes or {}
        self.defaults = (body.sampling, body.top_logprobs)
        self.draws = body.soft_labels.sampled()
        self.sampling = with_draws(normalize_sampling(body.mode, body.sampling.values()), self.draws)
        self.identity = teacher_identity(teacher.spec.model or teacher.name, teacher.revision,
                                         teacher.tokenizer_hash, teacher.spec.dtype)
        self.key_of = key_maker(self.identity, body.mode, self.sampling, body.top_logprobs)
        self.total = self.pending = 0
        self.gave_custom_ids = False
        # The hits of the batches written so far: a set for the first (a body job has only that
        # one), a fixed-size filter from the second (a file job's 10^7 keys are not held).
        self.earlier_hits: set[str] | SeenKeys = set()

    def runs_as_job(self, request: PreparedRequest) -> bool:
        """The request runs with the job's own sampling (most do: then it is the job's object,
        and the identity check spares comparing every field of every request)."""
        return request.sampling is self.body.sampling or request.sampling == self.body.sampling

    def sampling_of(self, request: PreparedRequest) -> dict[str, Any]:
        if self.runs_as_job(request):
            return self.sampling
        return with_draws(normalize_sampling(self.body.mode, request.sampling.values()), self.draws)

    def key(self, request: PreparedRequest, joined_prompt: str | None = None) -> str:
        if self.body.cache == "bypass":  # never shared, never found
            return f"bypass-{self.job.id}-{request.index}"
        if self.runs_as_job(request) and request.top_logprobs == self.body.top_logprobs:
            return self.key_of(request.prompt_token_ids, request.response_token_ids, joined_prompt)
        return cache_key(self.identity, self.body.mode, request.prompt_token_ids, request.response_token_ids,
                         self.sampling_of(request), request.top_logprobs)

    def keyed(self, prepared: list[Prepared]) -> KeyedBatch:
        """A batch ready to write but for the cache lookup (no database: this runs in the
        read-ahead thread of a file job, while the request's thread waits on Postgres): each
        prompt's ids joined once, for its key and its task's array literal."""
        keys: list[str | None] = []
        joined: list[str | None] = []
        for request in prepared:
            if isinstance(request, PreparedRequest):
                joined.append(",".join(map(str, request.prompt_token_ids)))
                keys.append(self.key(request, joined[-1]))
            else:  # refused alone: no key, no task
                keys.append(None)
                joined.append(None)
        rows = [self._row(r, k) for r, k in zip(prepared, keys)]
        return KeyedBatch(prepared, keys, rows, joined)

    def write(self, batch: KeyedBatch) -> int:
        """Write one batch; how many of its requests wait for the teacher."""
        body, service, job = self.body, self.service, self.job
        live = [k for k in batch.keys if k is not None]
        hits = service.results.results_for(live) if body.cache == "use" else {}
        pending = sum(k not in hits for k in live)
        # The cached spend counts each result once a job: not again for a hit an earlier batch had.
        before = self._hits_answered_before(list(hits))
        count_batch(job, {k: v for k, v in hits.items() if k not in before},
                    hits_answered=len(live) - pending, pending=pending, refused=len(batch.keys) - len(live))
        if hits:
            for row, key in zip(batch.rows, batch.keys):
                if key in hits:
                    answered_from_cache(row)
        service.jobs.session.flush()  # before any statement adjusts the counters in the database
        service.jobs.add_requests(batch.rows)
        # A task that finished while this job was being written (its result was not committed
        # when we looked): answer from it now, so nothing waits on a task that will not run.
        service.results.resolve_requests(self._enqueue_misses(batch, hits))
        service.jobs.session.refresh(job)  # the counters, as the statements above left them
        self.total += len(batch.prepared)
        self.pending += pending
        self.gave_custom_ids = self.gave_custom_ids or any(r.custom_id != str(r.index) for r in batch.prepared)
        return pending

    def _hits_answered_before(self, hits: list[str]) -> set[str]:
        """Of this batch's hits, those an earlier batch of the job was answered from: asked of
        the database only for the few the filter of earlier hits may hold."""
        if not self.total:  # the first batch: none before it
            self.earlier_hits = set(hits)
            return set()
        if isinstance(self.earlier_hits, set):
            self.earlier_hits = SeenKeys(self.earlier_hits)
        maybe = self.earlier_hits.maybe_seen(hits)
        self.earlier_hits.add(hits)
        return self.service.jobs.hits_answered_before(self.job.id, maybe) if maybe else set()

    def finish(self) -> None:
        """The tenant's pending limit over what was written, the job's total, and its start: a
        job with nothing left pending (answered wholly from the cache) is ready at once."""
        job = self.job
        self.service._check_pending(self.pending)
        job.total = self.total
        if job.n_pending == 0:
            job.status, job.started_at, job.ready_at = JobStatus.FINALIZING, sa.func.now(), sa.func.now()
        elif job.status == JobStatus.FINALIZING:  # an earlier batch's last pending request resolved meanwhile
            job.status, job.ready_at = JobStatus.QUEUED, None
        self.service.jobs.session.flush()
        self.service.jobs.session.refresh(job)  # now() as the database set it: the job is read after commit

    def _row(self, request: Prepared, key: str | None) -> dict[str, Any]:
        """A request's row: pending (write() marks the cache's answers), or (refused alone)
        failed from the start."""
        if isinstance(request, RejectedRequest):
            return rejected_row(self.job.id, request, self.notes.get(request.index))
        assert key is not None  # keyed() keys every request that runs
        return request_row(self.job.id, request, key, self.defaults, self.notes.get(request.index))

    def _enqueue_misses(self, batch: KeyedBatch, hits: dict[str, tuple[int, int]]) -> list[str]:
        """Queue (or join) a task per missed key, each waited on by this batch's requests with
        that key; the keys whose task was already done."""
        tasks: dict[str, NewTask] = {}
        waiters: dict[str, int] = {}
        for request, key, joined in zip(batch.prepared, batch.keys, batch.joined_prompts):
            if key is None or key in hits or not isinstance(request, PreparedRequest):
                continue
            waiters[key] = waiters.get(key, 0) + 1
            if key not in tasks:
                tasks[key] = NewTask(
                    key=key, teacher=self.teacher.name, mode=self.body.mode,
                    prompt_token_ids=request.prompt_token_ids, response_token_ids=request.response_token_ids,
                    sampling=self.sampling_of(request), top_logprobs=request.top_logprobs,
                    max_attempts=MAX_ATTEMPTS, messages=request.messages, interactive=self.interactive,
                    prompt_joined=joined,
                )
        return self.service.tasks.enqueue(list(tasks.values()), waiters, recompute_done=self.body.cache == "refresh")


@dataclass
class KeyedBatch:
    """One batch as JobWriter.keyed prepares it: the requests, their cache keys (None: refused
    alone), their rows as if none were a cache hit, and their prompts' ids joined by commas."""

    prepared: list[Prepared]
    keys: list[str | None]
    rows: list[dict[str, Any]]
    joined_prompts: list[str | None]


def count_batch(job: Job, hits: dict[str, tuple[int, int]], hits_answered: int, pending: int, refused: int) -> None:
    """The job's counters for one written batch: its hits answered, its misses pending, its
    refused requests failed, and the tokens of `hits` (the distinct results it was answered
    from that no earlier batch of the job was) as its cached spend."""
    job.n_pending = (job.n_pending or 0) + pending
    job.n_cached = (job.n_cached or 0) + hits_answered
    job.n_failed = (job.n_failed or 0) + refused
    job.cached_prompt_tokens = (job.cached_prompt_tokens or 0) + sum(p for p, _ in hits.values())
    job.cached_completion_tokens = (job.cached_completion_tokens or 0) + sum(c for _, c in hits.values())


def job_counts(job: Job) -> Counts:
    """The job's maintained counters (never a recount of its requests)."""
    return Counts(total=job.total, completed=job.n_completed, cached=job.n_cached, failed=job.n_failed,
                  pending=job.n_pending, cancelled=job.n_cancelled)


def spend_tokens(job: Job) -> SpendTokens:
    return {False: (job.sent_prompt_tokens, job.sent_completion_tokens),
            True: (job.cached_prompt_tokens, job.cached_completion_tokens)}


def own_parameters(request: PreparedRequest, defaults: tuple[Sampling, int]) -> dict[str, Any]:
    """What this request runs with that differs from the job's defaults (empty: the job's)."""
    sampling, top_logprobs = defaults
    own: dict[str, Any] = {}
    if changed := request.sampling.differing(sampling):
        own["sampling"] = changed
    if request.top_logprobs != top_logprobs:
        own["top_logprobs"] = request.top_logprobs
    return own


def request_row(job_id: str, request: PreparedRequest, key: str, defaults: tuple[Sampling, int],
                notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request's row, pending (answered_from_cache makes it a cache hit's)."""
    parameters = {**own_parameters(request, defaults), **(notes or {})}
    return {
        "job_id": job_id, "request_index": request.index, "custom_id": request.custom_id, "cache_key": key,
        "state": RequestState.PENDING, "cached": False, "result_key": None,
        "prompt_tokens": len(request.prompt_token_ids), "error": None,
        "parameters": json.dumps(parameters) if parameters else None,
    }


def answered_from_cache(row: dict[str, Any]) -> None:
    """A request row, pending, made one the cache answered: done, with the result its key names."""
    row.update(state=RequestState.DONE, cached=True, result_key=row["cache_key"])


def rejected_row(job_id: str, request: RejectedRequest, notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request that failed its own checks: failed from the start, never queued. Its parameters
    record that it was refused (`refused`: the field at fault), so a reader can tell it from one
    the teacher failed."""
    parameters = {**(notes or {}), "refused": {"field": request.field}}
    return {
        "job_id": job_id, "request_index": request.index, "custom_id": request.custom_id,
        "cache_key": f"rejected-{job_id}-{request.index}", "state": RequestState.FAILED, "cached": False,
        "result_key": None, "prompt_tokens": 0, "error": request.error, "parameters": json.dumps(parameters),
    }


def shard_out(shard: Shard, shard_url: ShardUrl) -> ShardOut:
    assert shard.shard_index is not None  # a job shard's (only a result shard has none)
    return ShardOut(index=shard.shard_index, url=shard_url(shard.id), rows=shard.rows, bytes=shard.bytes,
                    sha256=shard.sha256)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
