"""Assemble a finished job's output shards: its rows only, in request order, every request.

Rows computed by the teacher live in result shards shared through the cache; a job's shards
copy its rows out of them (so each job is self-contained and downloadable on its own), add
`custom_id`, `request_index` and `cached`, and record failed or cancelled requests with their
error. It streams: requests are read a window of `batch_rows` at a time (in request order),
their rows taken from just the row groups of the result shards that hold them, and written as
one row group of the job shard being written, so memory is bounded by the window, never by the
job. The result shards are first checked against their indexed size and sha256: a missing or
damaged one is not copied; its cache entries are dropped and its requests recomputed.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

from service.ids import new_id
from service.jobs.repository import JobRepository
from service.models import Job, Shard
from service.results.repository import AssemblyRow, ResultRepository
from service.settings import ServiceSettings
from service.states import JOB_FINISHED, JobStatus
from service.storage import ShardCheckFailed, Storage
from teachercache.shard_format import (
    JOB_SCHEMA,
    RESULT_FIELDS,
    SAMPLED_COLUMNS,
    TAIL_FIELD,
    error_row,
    open_shard,
    parquet_options,
    shard_metadata,
)
from teachercache.soft_labels import DEFAULT_ENCODING, Encoding, encode, stored_schema, tail_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssemblyLimits:
    shard_rows: int  # rows per job shard
    batch_rows: int  # requests read and written at a time: the memory bound
    max_attempts: int  # failed assemblies before the job ends failed
    backoff_s: float

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> AssemblyLimits:
        return cls(settings.shard_rows, settings.assembly_batch_rows, settings.finalize_max_attempts,
                   settings.finalize_backoff_s)




def finalize_one(jobs: JobRepository, storage: Storage, teacher_meta: dict[str, dict[str, str]], limits: AssemblyLimits,
                 on_end: Callable[[Job], None] = lambda job: None) -> Job | None:
    """Claim one job that is ready (all requests resolved, or cancelled) and assemble it.

    `on_end` runs, in the same savepoint, once the job has ended (the OpenAI layer writes a
    batch's output and error files there, once): what it writes commits with the job's end or
    not at all. An assembly that raises is rolled back to a savepoint and counted on the job
    (backoff, then `failed` with the reason), so the same job is not claimed again at once and
    every other job keeps being finalized.
    """
    job = jobs.claim_job_to_finalize()
    if job is None:
        return None
    try:
        with jobs.session.begin_nested():
            assemble(jobs, ResultRepository(jobs.session), storage, job, teacher_meta, limits)
            ended(jobs, job, on_end)
    except Exception as exc:  # noqa: BLE001 - any failure of one job is that job's, never the loop's
        log.exception("job %s: assembly failed", job.id)
        status = jobs.record_finalize_failure(job.id, f"assembly failed: {type(exc).__name__}: {exc}",
                                              limits.max_attempts, limits.backoff_s)
        jobs.session.refresh(job)
        log.warning("job %s: assembly attempt %d failed (%s)", job.id, job.finalize_attempts, status)
        ended(jobs, job, on_end)
    return job


def ended(jobs: JobRepository, job: Job, on_end: Callable[[Job], None]) -> None:
    jobs.session.flush()
    jobs.session.refresh(job)  # finished_at as the database set it
    if job.status in JOB_FINISHED:
        on_end(job)


def assemble(jobs: JobRepository, results: ResultRepository, storage: Storage, job: Job,
             teacher_meta: dict[str, dict[str, str]], limits: AssemblyLimits) -> None:
    if job.interactive:
        # The synchronous endpoints answered from the result shards (service/online), which stay
        # in the cache: job shards would be written for nobody to download.
        end_job(job)
        return
    damaged = damaged_sources(results, storage, job.id)
    if damaged:  # recompute them: the job moves back to running and is finalized when they resolve
        requeued = results.drop_damaged_shards(damaged)
        log.warning("job %s: %d result shards missing or damaged; requests of %d jobs requeued",
                    job.id, len(damaged), len(requeued))
        jobs.session.refresh(job)
        return
    metadata = shard_metadata({**teacher_meta.get(job.teacher, {"teacher": job.teacher}), **job_parameters(job)})
    encoding = job_encoding(job)
    schema = stored_schema(JOB_SCHEMA.with_metadata(metadata), encoding)
    batches = RowBuffer(job_batches(jobs, results, storage, job, limits.batch_rows))
    index = 0
    while index == 0 or not batches.exhausted():  # an empty job still gets one (empty) shard
        stored = storage.write(f"jobs/{job.id}/part-{index:05d}.parquet",
                               lambda f: write_part(f, schema, encoding, batches, limits.shard_rows))
        results.add_shard(Shard(id=new_id("shard"), kind="job", job_id=job.id, shard_index=index, path=stored.path,
                             rows=stored.rows, bytes=stored.bytes, sha256=stored.sha256))
        index += 1
    end_job(job)


def end_job(job: Job) -> None:
    job.status = JobStatus.CANCELLED if job.cancel_requested_at else JobStatus.SUCCEEDED
    job.error = None
    job.finished_at = sa.func.now()


def job_encoding(job: Job) -> Encoding:
    """How the job asked for its soft labels (jobs from before the choice existed: float32)."""
    return Encoding.named((job.soft_labels or {}).get("encoding", DEFAULT_ENCODING))


def job_parameters(job: Job) -> dict[str, Any]:
    """The shard metadata's parameters: with the soft-label kind, and a sampled job's draws."""
    soft_labels = job.soft_labels or {}
    kind = soft_labels.get("kind", "topk")
    draws = {name: soft_labels[name] for name in ("draws", "temperature", "seed") if name in soft_labels}
    return {"job_id": job.id, "mode": job.mode, "top_logprobs": job.top_logprobs, "sampling": job.sampling,
            "soft_label_kind": kind, **({"draws": draws} if draws else {})}


def damaged_sources(results: ResultRepository, storage: Storage, job_id: str) -> list[str]:
    """The result shards this job reads that are missing or fail their size/sha256 check.

    Hashing reads each shard once per version per process (Storage.verify remembers), so a shard
    shared by many jobs is hashed once, not once per job.
    """
    damaged = []
    for source in results.job_result_shards(job_id):
        try:
            storage.verify(source.path, source.bytes, source.sha256)
        except ShardCheckFailed as exc:
            log.error("result shard %s: %s", source.id, exc)
            damaged.append(source.id)
    return damaged


def job_batches(jobs: JobRepository, results: ResultRepository, storage: Storage, job: Job,
                batch_rows: int) -> Iterator[pa.Table]:
    """The job's rows in request order, a window of requests at a time (request indexes run
    0 .. total - 1, so the windows step over that range)."""
    for after in range(-1, job.total - 1, batch_rows):
        if window := results.assembly_rows(job.id, after, batch_rows):
            yield window_table(jobs, storage, window)


def window_table(jobs: JobRepository, storage: Storage, window: list[AssemblyRow]) -> pa.Table:
    """Every request's rows (n samples each) of one window, failed ones as error rows."""
    pieces = computed_pieces(storage, [r for r in window if r.shard_path is not None])
    failed = [r for r in window if r.shard_path is None]
    if failed:
        pieces.append(error_pieces(jobs, failed))
    table = pa.concat_tables([with_derived(p).select(JOB_SCHEMA.names).cast(JOB_SCHEMA) for p in pieces])
    order = pc.sort_indices(table, [("request_index", "ascending"), ("sample_index", "ascending")])
    return table.take(order)


def with_derived(piece: pa.Table) -> pa.Table:
    """The columns a job shard adds to the cache's rows: the tail mass from the float32 top-k,
    and null sampled columns for rows of result shards written before those columns existed."""
    for name in SAMPLED_COLUMNS:
        if name not in piece.column_names:
            piece = piece.append_column(name, pa.nulls(piece.num_rows, JOB_SCHEMA.field(name).type))
    return piece.append_column(TAIL_FIELD.name, tail_logprobs(piece["top_logprobs"]))


def computed_pieces(storage: Storage, rows: list[AssemblyRow]) -> list[pa.Table]:
    by_shard: dict[str, list[AssemblyRow]] = defaultdict(list)
    for row in rows:
        if row.shard_path is not None:  # the caller passes answered requests only
            by_shard[row.shard_path].append(row)
    return [rows_from_shard(storage, path, wanted) for path, wanted in by_shard.items()]


def rows_from_shard(storage: Storage, path: str, wanted: list[AssemblyRow]) -> pa.Table:
    """The wanted rows of one result shard, reading only the row groups that hold them."""
    wanted = sorted(wanted, key=lambda r: span(r)[0])
    spans = [span(r) for r in wanted]
    with storage.open(path) as f:
        parquet, _ = open_shard(f, f"result shard {path}")
        starts = row_group_starts(parquet.metadata)
        indices = [i for start, count in spans for i in range(start, start + count)]
        groups = sorted({bisect.bisect_right(starts, i) - 1 for i in indices})
        columns = [name for name in parquet.schema_arrow.names if name != "cache_key"]
        read = parquet.read_row_groups(groups, columns=columns)
    # Positions within the row groups read: each group's rows follow the previous group's.
    offset: dict[int, int] = {}
    base = 0
    for group in groups:
        offset[group] = base - starts[group]
        base += parquet.metadata.row_group(group).num_rows
    local = [i + offset[bisect.bisect_right(starts, i) - 1] for i in indices]
    return label(read.take(pa.array(local, pa.int64())), wanted, [count for _, count in spans])


def span(row: AssemblyRow) -> tuple[int, int]:
    """An answered request's (first row, rows) in its result shard."""
    assert row.row_start is not None and row.row_count is not None  # answered: it has a shard and its rows
    return row.row_start, row.row_count


def row_group_starts(metadata: pq.FileMetaData) -> list[int]:
    starts: list[int] = []
    total = 0
    for group in range(metadata.num_row_groups):
        starts.append(total)
        total += metadata.row_group(group).num_rows
    return starts


def label(table: pa.Table, wanted: list[AssemblyRow], repeat: list[int]) -> pa.Table:
    """Add the job's own columns, each request's value repeated over its samples."""
    def spread(values: list[Any], type_: pa.DataType) -> pa.Array:
        return pa.array([v for v, n in zip(values, repeat) for _ in range(n)], type_)

    table = table.append_column("custom_id", spread([r.custom_id for r in wanted], pa.string()))
    table = table.append_column("request_index", spread([r.request_index for r in wanted], pa.int32()))
    table = table.append_column("parameters", spread([parameters_json(r) for r in wanted], pa.string()))
    return table.append_column("cached", spread([r.cached for r in wanted], pa.bool_()))


def parameters_json(row: AssemblyRow) -> str | None:
    return json.dumps(row.parameters, sort_keys=True) if row.parameters else None


def error_pieces(jobs: JobRepository, failed: list[AssemblyRow]) -> pa.Table:
    prompts = ResultRepository(jobs.session).prompts_for([r.cache_key for r in failed])
    rows = [error_row(0, prompts.get(r.cache_key, []), r.error or r.state) for r in failed]
    table = pa.Table.from_pylist(rows, schema=pa.schema(RESULT_FIELDS))
    return label(table, failed, [1] * len(failed))


class RowBuffer:
    """Tables from an iterator, handed out `n` rows at a time (job shards cut across windows)."""

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        self.tables = tables
        self.current: pa.Table | None = None

    def exhausted(self) -> bool:
        while self.current is None or self.current.num_rows == 0:
            self.current = next(self.tables, None)
            if self.current is None:
                return True
        return False

    def take(self, n: int) -> pa.Table | None:
        if self.exhausted():
            return None
        assert self.current is not None  # not exhausted: a table with rows is there
        piece, self.current = self.current.slice(0, n), self.current.slice(n)
        return piece


def write_part(f: BinaryIO, schema: pa.Schema, encoding: Encoding, batches: RowBuffer, shard_rows: int) -> int:
    """One job shard: up to `shard_rows` rows, a row group per window slice, its soft labels in
    the job's encoding (encoded here, in the finalizer, a window at a time; never in a worker's
    engine thread)."""
    rows = 0
    first = batches.take(shard_rows)
    if first is not None:  # compact codes ids by their frequency in the shard's first window
        encoding = encoding.fitted(first)
        schema = schema.with_metadata({**(schema.metadata or {}), **encoding.metadata()})
    with pq.ParquetWriter(f, schema, **parquet_options(schema)) as writer:
        while rows < shard_rows and (piece := first if rows == 0 else batches.take(shard_rows - rows)) is not None:
            writer.write_table(encode(piece, encoding, schema))
            rows += piece.num_rows
        if rows == 0:
            writer.write_table(schema.empty_table())
    return rows
