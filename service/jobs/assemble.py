"""Assemble a finished job's output shards: its rows only, in request order, every request.

Rows computed by the teacher live in result shards shared through the cache; a job's shards
copy its rows out of them (so each job is self-contained and downloadable on its own), add
`custom_id`, `request_index` and `cached`, and record failed or cancelled requests with
their error. The job's shards and its new status are indexed in one transaction.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import sqlalchemy as sa
import pyarrow.compute as pc

from service.ids import new_id
from service.jobs.repository import JobRepository, OutputRow
from service.jobs.spend import stored_spend
from service.models import Job, Shard
from service.shards import JOB_SCHEMA, RESULT_FIELDS, error_row, shard_metadata
from service.storage import Storage


def finalize_one(jobs: JobRepository, storage: Storage, teacher_meta: dict, shard_rows: int) -> Job | None:
    """Claim one job that is ready (all requests resolved, or cancelled) and assemble it."""
    job = jobs.claim_job_to_finalize()
    if job is None:
        return None
    table = job_table(jobs, storage, jobs.output_rows(job.id))
    metadata = shard_metadata({**teacher_meta.get(job.teacher, {"teacher": job.teacher}), **job_parameters(job)})
    for index, start in enumerate(range(0, max(table.num_rows, 1), shard_rows)):
        stored = storage.write_table(f"jobs/{job.id}/part-{index:05d}.parquet", table.slice(start, shard_rows), metadata)
        jobs.add_shard(Shard(id=new_id("shard"), kind="job", job_id=job.id, shard_index=index, path=stored.path,
                             rows=stored.rows, bytes=stored.bytes, sha256=stored.sha256))
    job.status = "cancelled" if job.cancel_requested_at else "succeeded"
    job.finished_at = sa.func.now()
    job.spend_tokens = stored_spend(jobs.spend_tokens(job.id))
    return job


def job_parameters(job: Job) -> dict:
    return {"job_id": job.id, "mode": job.mode, "top_logprobs": job.top_logprobs, "sampling": job.sampling}


def job_table(jobs: JobRepository, storage: Storage, rows: list[OutputRow]) -> pa.Table:
    """Every request's rows in request order (n samples each), failed ones as error rows."""
    pieces = computed_pieces(storage, [r for r in rows if r.shard_path is not None])
    failed = [r for r in rows if r.shard_path is None]
    if failed:
        pieces.append(error_pieces(jobs, failed))
    table = pa.concat_tables(pieces) if pieces else JOB_SCHEMA.empty_table()
    order = pc.sort_indices(table, [("request_index", "ascending"), ("sample_index", "ascending")])
    if not is_identity(order):  # copying every row is most of the assembly time; skip it when in order
        table = table.combine_chunks().take(order)  # a take across many chunks is several times slower
    return table.select(JOB_SCHEMA.names).cast(JOB_SCHEMA)


def is_identity(order: pa.Array) -> bool:
    return len(order) == 0 or pc.all(pc.equal(order, pa.array(range(len(order)), order.type))).as_py()


def computed_pieces(storage: Storage, rows: list[OutputRow]) -> list[pa.Table]:
    """Read each result shard once and take the rows this job needs from it."""
    by_shard: dict[str, list[OutputRow]] = defaultdict(list)
    for row in rows:
        by_shard[row.shard_path].append(row)
    return [rows_from_shard(storage.read_table(path), wanted) for path, wanted in by_shard.items()]


def rows_from_shard(shard: pa.Table, wanted: list[OutputRow]) -> pa.Table:
    """In shard order: a batch asked for again wants whole runs of a shard, sliced without a
    copy; job_table puts the rows in request order with one take over all shards."""
    wanted = sorted(wanted, key=lambda r: r.row_start)
    indices = [i for r in wanted for i in range(r.row_start, r.row_start + r.row_count)]
    if indices == list(range(indices[0], indices[0] + len(indices))):
        taken = shard.slice(indices[0], len(indices))
    else:
        taken = shard.take(pa.array(indices, pa.int64()))
    taken = taken.drop_columns(["cache_key"])
    repeat = [r.row_count for r in wanted]
    return label(taken, wanted, repeat)


def label(table: pa.Table, wanted: list[OutputRow], repeat: list[int]) -> pa.Table:
    """Add the job's own columns, each request's value repeated over its samples."""
    def spread(values, type_):
        return pa.array([v for v, n in zip(values, repeat) for _ in range(n)], type_)

    table = table.append_column("custom_id", spread([r.custom_id for r in wanted], pa.string()))
    table = table.append_column("request_index", spread([r.request_index for r in wanted], pa.int32()))
    return table.append_column("cached", spread([r.cached for r in wanted], pa.bool_()))


def error_pieces(jobs: JobRepository, failed: list[OutputRow]) -> pa.Table:
    prompts = jobs.prompts_for([r.cache_key for r in failed])
    rows = [error_row(0, prompts.get(r.cache_key, []), r.error or r.state) for r in failed]
    table = pa.Table.from_pylist(rows, schema=pa.schema(RESULT_FIELDS))
    return label(table, failed, [1] * len(failed))
