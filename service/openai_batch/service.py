"""Files and batches on top of native jobs. Services never commit: the request handler does.

A batch is validated when it is created: a bad input file ends it `failed` at once (no job);
a good one becomes one native job, whose status the batch mirrors. The output and error files
are built lazily, the first time the batch is read after its job has finished.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
from sqlalchemy import orm

from service.errors import NotFound, ValidationFailed
from service.ids import new_id
from service.jobs.limits import JobLimits
from service.jobs.repository import JobRepository
from service.jobs.service import JobService
from service.models import Job
from service.openai_batch import output_file
from service.openai_batch.input_file import ParsedInput, parse_input
from service.openai_batch.models import OpenAIBatch, OpenAIFile
from service.openai_batch.repository import OpenAIBatchRepository
from service.openai_batch.schemas import (
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchObject,
    FileObject,
    RequestCounts,
)
from service.runtime import Runtime
from service.tenants.service import TenantService
from service.text import storable_text

MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
FINAL = ("completed", "failed", "cancelled", "expired")
JOB_FINISHED = ("succeeded", "failed", "cancelled")


def completion_window(window: str) -> timedelta:
    """OpenAI's completion windows are whole hours ("24h")."""
    return timedelta(hours=int(window.removesuffix("h")))


def now() -> datetime:
    return datetime.now(UTC)


def unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


@dataclass(frozen=True)
class StoredLines:
    file: OpenAIFile
    lines: int


class OpenAIBatchService:
    """A tenant's files and batches: another tenant's are not found."""

    def __init__(self, session: orm.Session, rt: Runtime, tenant: str, limits: JobLimits | None = None) -> None:
        self.session = session
        self.rt = rt
        self.tenant = tenant
        self.repo = OpenAIBatchRepository(session)
        self.jobs = JobService(session, tenant, limits)

    # files

    def upload(self, filename: str, purpose: str, data: bytes) -> OpenAIFile:
        if purpose != "batch":
            raise ValidationFailed("purpose: only 'batch' files are accepted", field="purpose")
        if len(data) > MAX_FILE_BYTES:
            raise ValidationFailed(f"file: larger than {MAX_FILE_BYTES} bytes", field="file")
        try:
            storable_text(filename)
        except ValueError as exc:
            raise ValidationFailed(f"file: the file name {exc}", field="file") from None
        return self._store_file(filename, purpose, data)

    def _store_file(self, filename: str, purpose: str, data: bytes) -> OpenAIFile:
        # Written before its row: a crash in between leaves an unreferenced file, never a dangling row.
        file_id = new_id("file")
        path = f"files/{file_id}.jsonl"
        self.rt.storage.write_bytes(path, data)  # atomic, like a shard: a crash leaves no half file
        row = OpenAIFile(id=file_id, tenant=self.tenant, purpose=purpose, filename=filename[:500], bytes=len(data), path=path,
                         created_at=now())
        self.repo.add(row)
        return row

    def file(self, file_id: str) -> OpenAIFile:
        row = self.repo.file(file_id, self.tenant)
        if row is None:
            raise NotFound(f"no file {file_id!r}", field="file_id")
        return row

    def content(self, file_id: str) -> bytes:
        return self.rt.storage.read_bytes(self.file(file_id).path)

    # batches

    def create(self, body: BatchCreate) -> OpenAIBatch:
        source = self.file(body.input_file_id)
        if source.purpose != "batch":
            raise ValidationFailed("input_file_id: the file's purpose is not 'batch'", field="input_file_id")
        batch = OpenAIBatch(id=new_id("batch"), tenant=self.tenant, input_file_id=source.id, endpoint=body.endpoint,
                            completion_window=body.completion_window, status="validating",
                            metadata_=body.metadata or {}, created_at=now())
        self.repo.add(batch)
        parsed = parse_input(self.rt.storage.read_bytes(source.path), body.endpoint, set(self.rt.teachers.registry.teachers))
        if isinstance(parsed, list):
            self._fail(batch, parsed)
        else:
            self._start(batch, parsed)
        return batch

    def _start(self, batch: OpenAIBatch, parsed: ParsedInput) -> None:
        parsed.job.metadata = {"openai_batch_id": batch.id, "openai_endpoint": batch.endpoint,
                               "openai_logprobs": parsed.wants_logprobs}
        try:
            with self.session.begin_nested():  # a rejected submission leaves no partial job behind
                job = self.jobs.submit(parsed.job, self.rt.teachers.get(parsed.teacher), before_write=self._spend)
        except ValidationFailed as exc:
            if exc.status_code == 429:  # the tenant has too much in flight: refuse the batch, keep nothing
                raise
            self._fail(batch, [error_from_submission(exc, parsed.line_numbers)])
            return
        batch.job_id = job.id
        batch.status, batch.in_progress_at = "in_progress", now()
        batch.request_total = job.total

    def _spend(self) -> None:
        """The tenant's submission token, in this transaction: only a batch that starts a job spends one."""
        TenantService(self.session).spend_submission(self.tenant, self.jobs.limits)

    def _fail(self, batch: OpenAIBatch, errors: list[BatchError]) -> None:
        batch.status, batch.failed_at = "failed", now()
        batch.errors = [e.model_dump() for e in errors]

    def get(self, batch_id: str, lock: bool = False) -> OpenAIBatch:
        batch = self.repo.batch(batch_id, self.tenant, lock=lock)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r}", field="batch_id")
        return batch

    def cancel(self, batch_id: str) -> OpenAIBatch:
        batch = self.sync(self.get(batch_id, lock=True))
        if batch.status in FINAL or batch.job_id is None:
            return batch
        self.jobs.cancel(batch.job_id)
        batch.status, batch.cancelling_at = "cancelling", batch.cancelling_at or now()
        return self.sync(batch)

    def sync(self, batch: OpenAIBatch) -> OpenAIBatch:
        """Bring the batch up to date with its job (the caller holds its row lock)."""
        if batch.status in FINAL or batch.job_id is None:
            return batch
        job = self.jobs.get(batch.job_id)
        if self._window_ran_out(batch, job):
            self.jobs.cancel(job.id)  # what is done stays; the rest is reported expired
            batch.expired_at = now()
        batch.request_completed = job.n_completed + job.n_cached
        batch.request_failed = job.n_failed
        if job.status in JOB_FINISHED and job.finished_at is not None:
            self._finish(batch, job)
        elif job.status == "finalizing" and job.cancel_requested_at is None:
            batch.status, batch.finalizing_at = "finalizing", batch.finalizing_at or now()
        return batch

    @staticmethod
    def _window_ran_out(batch: OpenAIBatch, job: Job) -> bool:
        """Past its completion window with work still pending (a finalizing job is done working)."""
        if batch.expired_at is not None or job.status not in ("queued", "running"):
            return False
        return now() > batch.created_at + completion_window(batch.completion_window)

    def _finish(self, batch: OpenAIBatch, job: Job) -> None:
        if job.status == "failed":
            self._fail(batch, [BatchError(code="job_failed", message=job.error or "the job failed")])
            return
        self._write_results(batch, job)
        batch.finalizing_at = batch.finalizing_at or now()
        if job.status == "cancelled" and batch.expired_at is not None:
            batch.status = "expired"
        elif job.status == "cancelled":
            batch.status, batch.cancelled_at = "cancelled", now()
        else:
            batch.status, batch.completed_at = "completed", now()

    def _write_results(self, batch: OpenAIBatch, job: Job) -> None:
        """The output and error files, streamed from the job's shards (one pass each), never the
        whole job in memory: a batch of 50,000 requests is as cheap in memory as one of ten."""
        output = self._store_lines(f"{batch.id}_output.jsonl", self._result_lines(batch, job, errors=False))
        error = self._store_lines(f"{batch.id}_error.jsonl", self._result_lines(batch, job, errors=True))
        batch.request_completed = output.lines if output else 0
        batch.request_failed = error.lines if error else 0
        batch.output_file_id = output.file.id if output else None
        batch.error_file_id = error.file.id if error else None

    def _store_lines(self, filename: str, lines: Iterator[str]) -> StoredLines | None:
        """A JSONL file of `lines` (none: no file), written and published like any stored object."""
        file_id = new_id("file")
        path = f"files/{file_id}.jsonl"
        count = 0

        def fill(f) -> None:
            nonlocal count
            for line in lines:
                f.write(line.encode() + b"\n")
                count += 1

        stored = self.rt.storage.write(path, fill)
        if count == 0:
            self.rt.storage.delete(path)
            return None
        row = OpenAIFile(id=file_id, tenant=self.tenant, purpose="batch_output", filename=filename, bytes=stored.bytes,
                         path=path, created_at=now())
        self.repo.add(row)
        return StoredLines(row, count)

    def _result_lines(self, batch: OpenAIBatch, job: Job, errors: bool) -> Iterator[str]:
        teacher = self.rt.teachers.get(job.teacher)
        decoded: dict[int, str] = {}

        def decode(token_id: int) -> str:
            if token_id not in decoded:
                decoded[token_id] = teacher.decode([token_id])
            return decoded[token_id]

        wants_logprobs = bool(job.metadata_.get("openai_logprobs"))
        created = unix(job.finished_at) or int(time.time())
        for _, samples in output_file.request_groups(self._job_rows(job.id)):
            problem = output_file.request_error(samples)
            if problem is None and not errors:
                yield output_file.success_line(samples, batch.endpoint, job.teacher, created, wants_logprobs, decode)
            elif problem is not None and errors:
                expired = batch.expired_at is not None and problem == "cancelled"
                yield output_file.error_line(samples[0]["custom_id"], problem, expired)

    def _job_rows(self, job_id: str) -> Iterator[dict]:
        """The job's rows in request order (as its shards hold them), a row group at a time."""
        for shard in JobRepository(self.session).job_shards(job_id):
            with self.rt.storage.open(shard.path) as f:
                for rows in pq.ParquetFile(f).iter_batches(batch_size=1024):
                    yield from rows.to_pylist()

    def list(self, limit: int, after: str | None) -> tuple[list[OpenAIBatch], bool]:
        before = None
        if after:
            cursor = self.get(after)
            before = (cursor.created_at, cursor.id)
        batches = self.repo.list_batches(self.tenant, limit + 1, before)
        # Row-locked like a single GET, so two readers never both build a batch's output files.
        page = [b if b.status in FINAL else self.sync(self.get(b.id, lock=True)) for b in batches[:limit]]
        return page, len(batches) > limit


def error_from_submission(exc: ValidationFailed, line_numbers: list[int]) -> BatchError:
    """A native validation error (e.g. a prompt too long for the teacher) names request i: report its file line."""
    index = exc.details.get("request_index")
    field = str(exc.details.get("field", ""))
    if index is None and field.startswith("requests["):
        index = int(field[len("requests["):field.index("]")])
    return BatchError(code="invalid_request", message=exc.message, param=field or None,
                      line=line_numbers[index] if index is not None and index < len(line_numbers) else None)


def describe_file(row: OpenAIFile) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=unix(row.created_at), filename=row.filename,
                      purpose=row.purpose)


def describe_batch(batch: OpenAIBatch) -> BatchObject:
    errors = BatchErrors(data=[BatchError(**e) for e in batch.errors]) if batch.errors else None
    metadata = {**(batch.metadata_ or {}), **({"teachercache_job_id": batch.job_id} if batch.job_id else {})}
    return BatchObject(
        id=batch.id, endpoint=batch.endpoint, errors=errors, input_file_id=batch.input_file_id,
        completion_window=batch.completion_window, status=batch.status, output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id, created_at=unix(batch.created_at),
        in_progress_at=unix(batch.in_progress_at), finalizing_at=unix(batch.finalizing_at),
        completed_at=unix(batch.completed_at), failed_at=unix(batch.failed_at),
        cancelling_at=unix(batch.cancelling_at), cancelled_at=unix(batch.cancelled_at),
        expires_at=unix(batch.created_at + completion_window(batch.completion_window)),
        expired_at=unix(batch.expired_at),
        request_counts=RequestCounts(total=batch.request_total, completed=batch.request_completed,
                                     failed=batch.request_failed),
        metadata=metadata,
    )
