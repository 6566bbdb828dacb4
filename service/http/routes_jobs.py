"""Jobs: submit, list, get, cancel, shards manifest, errors. Every route is the caller's tenant's."""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, BackgroundTasks, Depends, Header, Query, Request, Response

from service.http.deps import Jobs, Limits, Rt, Who, caller, jobs_of, shard_url_builder
from service.http.json_body import body_schema, json_body
from service.http.params import JobCursor, JobId
from service.jobs.limits import JobLimits
from service.jobs.schemas import ErrorList, JobCreate, JobList, JobOut, ShardList
from service.jobs.service import check_one_source, prepare_submission
from service.models import Job
from service.results.retention import remove_objects
from service.runtime import Runtime
from service.tenants.service import Caller

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(caller)])


@router.post("", status_code=201, response_model=JobOut, openapi_extra=body_schema(JobCreate),
             responses={200: {"model": JobOut, "description": "a retry (same Idempotency-Key): the job it created"}})
def submit_job(body: Annotated[JobCreate, Depends(json_body(JobCreate))], request: Request, response: Response,
               background: BackgroundTasks, rt: Rt, who: Who, limits: Limits,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    urls = shard_url_builder(request)  # first: a refused Host must leave no job behind
    job, created = submit_once(rt, who, limits, body, idempotency_key)
    if not created:
        response.status_code = 200
    background.add_task(request.app.state.finalizer.wake)
    with rt.sessions() as db:
        return jobs_of(db, rt, who).describe(job, urls)


def submit_once(rt: Runtime, who: Caller, limits: JobLimits, body: JobCreate,
                idempotency_key: str | None) -> tuple[Job, bool]:
    """Write the whole job in one transaction on one connection (the Idempotency-Key's lock and the
    rate-limit spend share it); a concurrent retry with the same key gets that job. A retry is
    answered, never rate-limited."""
    check_one_source(body)
    teacher = rt.teachers.get(body.teacher)
    # A body is tokenized before a connection is taken; a file is read a batch at a time as it is written.
    prepared = prepare_submission(body, teacher, limits) if body.requests is not None else None
    try:
        with rt.sessions() as db, db.begin():
            service = jobs_of(db, rt, who)
            existing = service.find_retry(idempotency_key, body)
            if existing is not None:
                return existing, False
            if prepared is None:
                return service.submit_file(body, teacher, rt.storage, idempotency_key), True
            return service.submit(body, teacher, idempotency_key, prepared=prepared), True
    except sa.exc.IntegrityError:
        if idempotency_key is None:
            raise
        with rt.sessions() as db:  # the concurrent first submission committed: answer with it
            existing = jobs_of(db, rt, who).find_retry(idempotency_key, body)
        if existing is None:
            raise  # not the Idempotency-Key's constraint: nothing to answer with
        return existing, False


@router.get("", response_model=JobList)
def list_jobs(request: Request, jobs: Jobs, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: JobCursor = None) -> JobList:
    page, has_more = jobs.page(limit, after)
    data = [jobs.describe(j, shard_url_builder(request)) for j in page]
    return JobList(data=data, has_more=has_more, next=data[-1].id if has_more else None)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobId, request: Request, jobs: Jobs) -> JobOut:
    return jobs.describe(jobs.get(job_id), shard_url_builder(request))


@router.delete("/{job_id}", responses={409: {"description": "the job has not ended yet"}})
def delete_job(job_id: JobId, rt: Rt, jobs: Jobs, background: BackgroundTasks) -> dict[str, Any]:
    """Remove a finished job, its requests and its shards; the cache it used is kept."""
    paths = jobs.delete(job_id, rt.settings.retention_delete_rows)
    background.add_task(remove_objects, rt.storage, paths)  # after the commit: the index goes first
    return {"id": job_id, "object": "job.deleted", "deleted": True}


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: JobId, request: Request, jobs: Jobs) -> JobOut:
    job = jobs.cancel(job_id)
    request.app.state.finalizer.wake()
    return jobs.describe(job, shard_url_builder(request))


@router.get("/{job_id}/shards", response_model=ShardList)
def job_shards(job_id: JobId, request: Request, jobs: Jobs) -> ShardList:
    return ShardList(shards=jobs.shards(job_id, shard_url_builder(request)))


@router.get("/{job_id}/errors", response_model=ErrorList)
def job_errors(job_id: JobId, jobs: Jobs, limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
               after: Annotated[int, Query(ge=-1, le=2**31 - 1, description="the last request_index of the previous page")] = -1
               ) -> ErrorList:
    errors, has_more = jobs.errors(job_id, limit, after)
    return ErrorList(errors=errors, has_more=has_more, next=errors[-1].request_index if has_more else None)
