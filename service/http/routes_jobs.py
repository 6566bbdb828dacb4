"""Jobs: submit, list, get, cancel, shards manifest, errors. Every route is the caller's tenant's."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, BackgroundTasks, Depends, Header, Query, Request, Response

from service.http.deps import Db, Limits, Rt, Who, caller, shard_url_builder, spend_submission
from service.http.params import JobCursor, JobId
from service.jobs.limits import JobLimits
from service.jobs.schemas import ErrorList, JobCreate, JobList, JobOut, ShardList
from service.jobs.service import JobService
from service.runtime import Runtime
from service.tenants.service import Caller

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(caller)])


@router.post("", status_code=201, response_model=JobOut,
             responses={200: {"model": JobOut, "description": "a retry (same Idempotency-Key): the job it created"}})
def submit_job(body: JobCreate, request: Request, response: Response, background: BackgroundTasks, rt: Rt,
               who: Who, limits: Limits,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    job, created = submit_once(rt, who, limits, body, idempotency_key)
    if not created:
        response.status_code = 200
    background.add_task(request.app.state.finalizer.wake)
    with rt.sessions() as db:
        return JobService(db, who.tenant).describe(job, shard_url_builder(request))


def submit_once(rt: Runtime, who: Caller, limits: JobLimits, body: JobCreate, idempotency_key: str | None):
    """Write the whole job in one transaction; a concurrent retry with the same key gets that job."""
    teacher = rt.teachers.get(body.teacher)
    try:
        with rt.sessions() as db, db.begin():
            service = JobService(db, who.tenant, limits)
            existing = service.find_retry(idempotency_key, body)
            if existing is not None:
                return existing, False  # a retry is answered, never rate-limited
            spend_submission(rt, who.tenant)
            return service.submit(body, teacher, idempotency_key), True
    except sa.exc.IntegrityError:
        if idempotency_key is None:
            raise
        with rt.sessions() as db:  # the concurrent first submission committed: answer with it
            return JobService(db, who.tenant).find_retry(idempotency_key, body), False


@router.get("", response_model=JobList)
def list_jobs(request: Request, db: Db, who: Who, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: JobCursor = None) -> JobList:
    service = JobService(db, who.tenant)
    jobs, has_more = service.page(limit, after)
    urls = shard_url_builder(request)
    page = [service.describe(j, urls) for j in jobs]
    return JobList(data=page, has_more=has_more, next=page[-1].id if has_more else None)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobId, request: Request, db: Db, who: Who) -> JobOut:
    service = JobService(db, who.tenant)
    return service.describe(service.get(job_id), shard_url_builder(request))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: JobId, request: Request, db: Db, who: Who) -> JobOut:
    service = JobService(db, who.tenant)
    job = service.cancel(job_id)
    request.app.state.finalizer.wake()
    return service.describe(job, shard_url_builder(request))


@router.get("/{job_id}/shards", response_model=ShardList)
def job_shards(job_id: JobId, request: Request, db: Db, who: Who) -> ShardList:
    return ShardList(shards=JobService(db, who.tenant).shards(job_id, shard_url_builder(request)))


@router.get("/{job_id}/errors", response_model=ErrorList)
def job_errors(job_id: JobId, db: Db, who: Who) -> ErrorList:
    return ErrorList(errors=JobService(db, who.tenant).errors(job_id))
