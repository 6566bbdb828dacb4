"""Files and batches on top of native jobs. Services never commit: the request handler does.

A batch is validated when it is created: a bad input file ends it `failed` at once (no job);
a good one becomes one native job, whose status the batch mirrors. The output and error files
are written once, by the finalizer, in the transaction that ends the job (`finish_openai_batch`),
streamed from the job's shards a row group at a time through the storage port (atomic writes),
so reading a batch never writes anything and memory does not grow with the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from sqlalchemy import orm

from service.errors import LimitExceeded, NotFound, ValidationFailed
from service.ids import new_id
from service.jobs.limits import JobLimits
from service.jobs.schemas import RequestIn
from service.jobs.service import JobService, prepare_submission
from service.jobs.tokenize import Prepared, RejectedRequest
from service.models import Job
from service.openai_batch import output_file
from service.openai_batch.input_file import LineFailure, ParsedInput, parse_input
from service.openai_batch.models import OpenAIBatch, OpenAIFile
from service.openai_batch.repository import OpenAIBatchRepository
from service.openai_batch.schemas import (
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchObject,
    BatchUsage,
    FileObject,
    RequestCounts,
)
from service.states import BATCH_FINISHED, JOB_ACTIVE, JOB_FINISHED, BatchStatus, JobStatus
from service.storage.port import Storage, StoredShard, storage_retry
from service.teachers.catalog import TeacherCatalog
from service.text import storable_text
from teachercache.shard_format import open_shard

log = logging.getLogger(__name__)
MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file (a native job's has none)
COPY_CHUNK_BYTES = 1024 * 1024


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
    """A tenant's files and batches: another tenant's are not found. `storage` holds the files,
    `teachers` tokenizes the inputs and decodes the outputs."""

    def __init__(self, session: orm.Session, tenant: str, storage: Storage, teachers: TeacherCatalog,
                 limits: JobLimits | None = None) -> None:
        self.session = session
        self.storage = storage
        self.teachers = teachers
        self.tenant = tenant
        self.repo = OpenAIBatchRepository(session)
        self.jobs = JobService(session, tenant, limits)

    # files

    def upload(self, filename: str, purpose: str, source: BinaryIO) -> OpenAIFile:
        """Store an uploaded file, copied a chunk at a time (a native job's input file may be gigabytes)."""
        if purpose != "batch":
            raise ValidationFailed("purpose: only 'batch' files are accepted", field="purpose")
        try:
            storable_text(filename)
        except ValueError as exc:
            raise ValidationFailed(f"file: the file name {exc}", field="file") from None
        return self._store_file(filename, purpose, source)

    def _store_file(self, filename: str, purpose: str, source: BinaryIO) -> OpenAIFile:
        # Written before its row: a crash in between leaves an unreferenced file, never a dangling row.
        file_id = new_id("file")
        path = f"files/{file_id}.jsonl"
        stored = copy_into(self.storage, path, source)  # atomic, like a shard: a crash leaves no half file
        row = OpenAIFile(id=file_id, tenant=self.tenant, purpose=purpose, filename=filename[:500], bytes=stored.bytes,
                         path=path, sha256=stored.sha256, created_at=now())
        self.repo.add(row)
        return row

    def file(self, file_id: str) -> OpenAIFile:
        row = self.repo.file(file_id, self.tenant)
        if row is None:
            raise NotFound(f"no file {file_id!r}", field="file_id")
        return row

    def content(self, file_id: str) -> bytes:
        return self.storage.read_bytes(self.file(file_id).path)

    # batches

    def create(self, body: BatchCreate) -> OpenAIBatch:
        source = self.file(body.input_file_id)
        soft_labels = body.soft_labels()  # a bad value is the request's error (422), before anything is kept
        if source.purpose != "batch":
            raise ValidationFailed("input_file_id: the file's purpose is not 'batch'", field="input_file_id")
        if source.bytes > MAX_FILE_BYTES:  # read whole below; a native job (POST /v1/jobs) streams any size
            raise ValidationFailed(f"input_file_id: the file is larger than {MAX_FILE_BYTES} bytes, OpenAI's limit "
                                   "for a batch input file; submit it as a native job (POST /v1/jobs with "
                                   "input_file_id), which has none", field="input_file_id")
        batch = OpenAIBatch(id=new_id("batch"), tenant=self.tenant, input_file_id=source.id, endpoint=body.endpoint,
                            completion_window=body.completion_window, status=BatchStatus.VALIDATING,
                            metadata_=body.metadata or {}, created_at=now(),
                            output_expires_after_s=body.output_expires_after.seconds if body.output_expires_after
                            else None)
        self.repo.add(batch)
        parsed = parse_input(self.storage.read_bytes(source.path), body.endpoint, self.teachers.names())
        if isinstance(parsed, list):
            self._fail(batch, parsed)
        else:
            parsed.job.soft_labels = soft_labels
            self._start(batch, parsed)
        return batch

    def _start(self, batch: OpenAIBatch, parsed: ParsedInput) -> None:
        # The default (the first line's); a line that asks otherwise is noted on its request.
        parsed.job.metadata = {"openai_batch_id": batch.id, "openai_endpoint": batch.endpoint,
                               "openai_logprobs": parsed.logprobs}
        teacher = self.teachers.get(parsed.teacher)
        try:
            prepared = line_requests(parsed, prepare_submission(parsed.job, teacher, self.jobs.limits,
                                                                reject_alone=True))
            with self.session.begin_nested():  # a rejected submission leaves no partial job behind
                job = self.jobs.submit(parsed.job, teacher, prepared=prepared, notes=line_notes(parsed))
        except (ValidationFailed, LimitExceeded) as exc:  # a RateLimited refuses the batch: nothing is kept
            self._fail(batch, [error_from_submission(exc, parsed.line_numbers)])
            return
        batch.job_id, batch.model = job.id, parsed.teacher
        batch.status, batch.in_progress_at = BatchStatus.IN_PROGRESS, now()
        batch.request_total = job.total

    def _fail(self, batch: OpenAIBatch, errors: list[BatchError]) -> None:
        batch.status, batch.failed_at = BatchStatus.FAILED, now()
        batch.errors = [e.model_dump() for e in errors]

    def get(self, batch_id: str, lock: bool = False) -> OpenAIBatch:
        batch = self.repo.batch(batch_id, self.tenant, lock=lock)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r}", field="batch_id")
        return batch

    def cancel(self, batch_id: str) -> OpenAIBatch:
        batch = self.sync(self.get(batch_id, lock=True))
        if batch.status in BATCH_FINISHED or batch.job_id is None:
            return batch
        self.jobs.cancel(batch.job_id)
        batch.status, batch.cancelling_at = BatchStatus.CANCELLING, batch.cancelling_at or now()
        return self.sync(batch)

    def sync(self, batch: OpenAIBatch) -> OpenAIBatch:
        """Bring the batch up to date with its job (the caller holds its row lock)."""
        if batch.status in BATCH_FINISHED or batch.job_id is None:
            return batch
        job = self.jobs.get(batch.job_id)
        if self._window_ran_out(batch, job):
            self.jobs.cancel(job.id)  # what is done stays; the rest is reported expired
            batch.expired_at = now()
        batch.request_completed = job.n_completed + job.n_cached
        batch.request_failed = job.n_failed
        if job.status in JOB_FINISHED and job.finished_at is not None:
            # Ended before the finalizer wrote batch files (a job finished by an older version).
            log.warning("batch %s: its job ended without its files; writing them now", batch.id)
            self._finish(batch, job)
        elif job.status == JobStatus.FINALIZING and job.cancel_requested_at is None:
            batch.status, batch.finalizing_at = BatchStatus.FINALIZING, batch.finalizing_at or now()
        return batch

    @staticmethod
    def _window_ran_out(batch: OpenAIBatch, job: Job) -> bool:
        """Past its completion window with work still pending (a finalizing job is done working)."""
        if batch.expired_at is not None or job.status not in JOB_ACTIVE:
            return False
        return now() > batch.created_at + completion_window(batch.completion_window)

    def _finish(self, batch: OpenAIBatch, job: Job) -> None:
        if job.status == JobStatus.FAILED:
            self._fail(batch, [BatchError(code="job_failed", message=job.error or "the job failed")])
            return
        self._write_results(batch, job)
        batch.finalizing_at = batch.finalizing_at or now()
        if job.status == JobStatus.CANCELLED and batch.expired_at is not None:
            batch.status = BatchStatus.EXPIRED
        elif job.status == JobStatus.CANCELLED:
            batch.status, batch.cancelled_at = BatchStatus.CANCELLED, now()
        else:
            batch.status, batch.completed_at = BatchStatus.COMPLETED, now()

    def _write_results(self, batch: OpenAIBatch, job: Job) -> None:
        """The output and error files, streamed from the job's shards (one pass each), never the
        whole job in memory: a batch of 50,000 requests is as cheap in memory as one of ten."""
        usage = BatchUsage()
        expires_at = now() + timedelta(seconds=batch.output_expires_after_s) if batch.output_expires_after_s else None
        output = self._store_lines(f"{batch.id}_output.jsonl", self._result_lines(batch, job, False, usage), expires_at)
        error = self._store_lines(f"{batch.id}_error.jsonl", self._result_lines(batch, job, True, usage), expires_at)
        batch.request_completed = output.lines if output else 0
        batch.request_failed = error.lines if error else 0
        batch.output_file_id = output.file.id if output else None
        batch.error_file_id = error.file.id if error else None
        usage.total_tokens = usage.input_tokens + usage.output_tokens
        batch.usage = usage.model_dump()

    def _store_lines(self, filename: str, lines: Iterator[str], expires_at: datetime | None) -> StoredLines | None:
        """A JSONL file of `lines` (none: no file), written and published like any stored object
        (atomically: temp + fsync + rename locally, one upload on an object store)."""
        file_id = new_id("file")
        path = f"files/{file_id}.jsonl"
        count = 0

        def fill(f: BinaryIO) -> None:
            nonlocal count
            for line in lines:
                f.write(line.encode() + b"\n")
                count += 1

        stored = self.storage.write(path, fill)
        if count == 0:
            self.storage.delete(path)
            return None
        row = OpenAIFile(id=file_id, tenant=self.tenant, purpose="batch_output", filename=filename, bytes=stored.bytes,
                         path=path, created_at=now(), expires_at=expires_at)
        self.repo.add(row)
        return StoredLines(row, count)

    def _result_lines(self, batch: OpenAIBatch, job: Job, errors: bool, usage: BatchUsage) -> Iterator[str]:
        teacher = self.teachers.get(job.teacher)
        decoded: dict[int, str] = {}

        def decode(token_id: int) -> str:
            if token_id not in decoded:
                decoded[token_id] = teacher.decode([token_id])
            return decoded[token_id]

        default_logprobs = bool(job.metadata_.get("openai_logprobs"))
        created = unix(job.finished_at) or int(time.time())
        for _, samples in output_file.request_groups(self._job_rows(job.id)):
            problem = output_file.request_error(samples)
            asked = output_file.asked(samples[0])
            if problem is None and not errors:
                wants_logprobs = asked.get("logprobs", default_logprobs)
                add_usage(usage, samples)
                yield output_file.success_line(samples, batch.endpoint, job.teacher, created, wants_logprobs, decode)
            elif problem is not None and errors and "refused" in asked:
                yield output_file.refused_line(samples[0]["custom_id"], problem, asked["refused"].get("field"))
            elif problem is not None and errors:
                expired = batch.expired_at is not None and problem == "cancelled"
                yield output_file.error_line(samples[0]["custom_id"], problem, expired)

    def _job_rows(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's rows in request order (as its shards hold them), a row group at a time."""
        for shard in self.jobs.stored_shards(job_id):
            with self.storage.open(shard.path) as f:
                parquet, _ = open_shard(f, where=shard.path)  # its schema version checked, as every reader does
                for rows in parquet.iter_batches(batch_size=1024):
                    yield from rows.to_pylist()

    def list_files(self, limit: int, after: str | None, purpose: str | None, order: str) -> tuple[list[OpenAIFile], bool]:
        before = None
        if after:
            cursor = self.file(after)
            before = (cursor.created_at, cursor.id)
        files = self.repo.list_files(self.tenant, limit + 1, before, purpose, ascending=order == "asc")
        return files[:limit], len(files) > limit

    def delete_file(self, file_id: str) -> str:
        """Remove a file's row; its stored object's path, for the caller to remove once this
        transaction has committed (a crash in between leaves an unreferenced object, never a row
        pointing at nothing). Batches keep the id; reading the file is then a 404."""
        row = self.file(file_id)
        self.repo.delete_file(row)
        return row.path

    def list(self, limit: int, after: str | None) -> tuple[list[OpenAIBatch], bool]:
        before = None
        if after:
            cursor = self.get(after)
            before = (cursor.created_at, cursor.id)
        batches = self.repo.list_batches(self.tenant, limit + 1, before)
        # Row-locked like a single GET, so two readers never both build a batch's output files.
        page = [b if b.status in BATCH_FINISHED else self.sync(self.get(b.id, lock=True)) for b in batches[:limit]]
        return page, len(batches) > limit


@storage_retry
def copy_into(storage: Storage, path: str, source: BinaryIO) -> StoredShard:
    def fill(f: BinaryIO) -> None:
        source.seek(0)  # from the start again on a retry
        shutil.copyfileobj(source, f, COPY_CHUNK_BYTES)

    return storage.write(path, fill)


def finish_openai_batch(session: orm.Session, storage: Storage, teachers: TeacherCatalog, job: Job) -> None:
    """The finalizer's step once a job has ended: if it is a batch's, write the batch's output and
    error files and end the batch, in the finalizer's transaction (so exactly once)."""
    batch_id = (job.metadata_ or {}).get("openai_batch_id")
    if not batch_id:
        return
    service = OpenAIBatchService(session, job.tenant, storage, teachers)
    batch = service.repo.batch(batch_id, job.tenant, lock=True)
    if batch is not None and batch.status not in BATCH_FINISHED:
        service._finish(batch, job)


def line_requests(parsed: ParsedInput, prepared: list[Prepared]) -> list[Prepared]:
    """The job's requests in file order: each runnable line's prepared request, and a rejected
    one for each line that cannot run (it fails alone, with its reason)."""
    out: list[Any] = [None] * len(parsed.lines)  # every position is filled below
    for item, position in zip(prepared, parsed.runnable):
        if isinstance(item, RejectedRequest):  # named as the line's body field, not the native request's
            native = f"requests[{item.index}]."
            field = body_field_of(item.field.removeprefix(native)) if item.field else None
            item = dataclasses.replace(item, field=field, error=item.error.replace(f"{item.field}:", f"{field}:"))
        out[position] = dataclasses.replace(item, index=position)
    for position, line in enumerate(parsed.lines):
        if isinstance(line.request, LineFailure):
            out[position] = RejectedRequest(position, line.custom_id, line.request.message, line.request.param)
    return out


def body_field_of(native: str) -> str:
    """A native request field as the line's body names it (`sampling.max_tokens` is `max_tokens`)."""
    name = native.removeprefix("sampling.")
    return "body." + ("prompt" if name == "prompt_token_ids" else name)


def line_notes(parsed: ParsedInput) -> dict[int, dict[str, Any]]:
    """What a line asked of its output beyond the native parameters, where it differs from the
    job's default: whether to carry logprobs."""
    return {position: {"logprobs": line.logprobs} for position, line in enumerate(parsed.lines)
            if line.logprobs != parsed.logprobs and isinstance(line.request, RequestIn)}


def error_from_submission(exc: ValidationFailed | LimitExceeded, line_numbers: list[int]) -> BatchError:
    """A native validation error (e.g. a prompt too long for the teacher) names request i: report its file line."""
    index = exc.details.get("request_index")
    field = str(exc.details.get("field", ""))
    if index is None and field.startswith("requests["):
        index = int(field[len("requests["):field.index("]")])
    return BatchError(code="invalid_request", message=exc.message, param=field or None,
                      line=line_numbers[index] if index is not None and index < len(line_numbers) else None)


def add_usage(usage: BatchUsage, samples: list[dict[str, Any]]) -> None:
    """One request's tokens, as its output line's usage counts them (prompt once, every sample)."""
    prompt = len(samples[0]["prompt_token_ids"])
    usage.input_tokens += prompt
    usage.output_tokens += sum(len(s["completion_token_ids"]) for s in samples)
    if samples[0].get("cached"):
        usage.input_tokens_details.cached_tokens += prompt


def describe_file(row: OpenAIFile) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=int(row.created_at.timestamp()), filename=row.filename,
                      purpose=row.purpose, expires_at=unix(row.expires_at))


def describe_batch(batch: OpenAIBatch) -> BatchObject:
    errors = BatchErrors(data=[BatchError(**e) for e in batch.errors]) if batch.errors else None
    metadata = {**(batch.metadata_ or {}), **({"teachercache_job_id": batch.job_id} if batch.job_id else {})}
    return BatchObject(
        id=batch.id, endpoint=batch.endpoint, errors=errors, input_file_id=batch.input_file_id,
        completion_window=batch.completion_window, status=BatchStatus(batch.status), output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id, created_at=int(batch.created_at.timestamp()),
        in_progress_at=unix(batch.in_progress_at), finalizing_at=unix(batch.finalizing_at),
        completed_at=unix(batch.completed_at), failed_at=unix(batch.failed_at),
        cancelling_at=unix(batch.cancelling_at), cancelled_at=unix(batch.cancelled_at),
        expires_at=unix(batch.created_at + completion_window(batch.completion_window)),
        expired_at=unix(batch.expired_at),
        request_counts=RequestCounts(total=batch.request_total, completed=batch.request_completed,
                                     failed=batch.request_failed),
        metadata=metadata, model=batch.model, usage=BatchUsage(**batch.usage) if batch.usage else None,
    )
