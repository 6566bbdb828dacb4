"""Jobs: submit, list, get, cancel, shards manifest, errors."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, BackgroundTasks, Depends, Header, Query, Request, Response
from sqlalchemy import orm

from service.http.deps import runtime, session, shard_url_builder
from service.jobs.schemas import ErrorList, JobCreate, JobList, JobOut, ShardList
from service.jobs.service import JobService
from service.runtime import Runtime

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
Db = Annotated[orm.Session, Depends(session)]
Rt = Annotated[Runtime, Depends(runtime)]


@router.post("", status_code=201, response_model=JobOut)
def submit_job(body: JobCreate, request: Request, response: Response, background: BackgroundTasks, rt: Rt,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    job, created = submit_once(rt, body, idempotency_key)
    if not created:
        response.status_code = 200
    background.add_task(request.app.state.finalizer.wake)
    with rt.sessions() as db:
        return JobService(db, rt.teachers.prices).describe(job, shard_url_builder(request))


def submit_once(rt: Runtime, body: JobCreate, idempotency_key: str | None):
    """Write the whole job in one transaction; a concurrent retry with the same key gets that job."""
    teacher = rt.teachers.get(body.teacher)
    try:
        with rt.sessions() as db, db.begin():
            service = JobService(db)
            existing = service.find_retry(idempotency_key, body)
            if existing is not None:
                return existing, False
            return service.submit(body, teacher, idempotency_key), True
    except sa.exc.IntegrityError:
        if idempotency_key is None:
            raise
        with rt.sessions() as db:  # the concurrent first submission committed: answer with it
            return JobService(db).find_retry(idempotency_key, body), False


@router.get("", response_model=JobList)
def list_jobs(request: Request, db: Db, rt: Rt, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(max_length=40)] = None) -> JobList:
    service = JobService(db, rt.teachers.prices)
    before = None
    if after:
        cursor = service.get(after)
        before = (cursor.created_at, cursor.id)
    jobs = service.jobs.list(limit + 1, before)
    urls = shard_url_builder(request)
    page = [service.describe(j, urls) for j in jobs[:limit]]
    return JobList(data=page, has_more=len(jobs) > limit, next=page[-1].id if len(jobs) > limit else None)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, request: Request, db: Db, rt: Rt) -> JobOut:
    service = JobService(db, rt.teachers.prices)
    return service.describe(service.get(job_id), shard_url_builder(request))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, request: Request, db: Db, rt: Rt) -> JobOut:
    service = JobService(db, rt.teachers.prices)
    job = service.cancel(job_id)
    request.app.state.finalizer.wake()
    return service.describe(job, shard_url_builder(request))


@router.get("/{job_id}/shards", response_model=ShardList)
def job_shards(job_id: str, request: Request, db: Db) -> ShardList:
    return ShardList(shards=JobService(db).shards(job_id, shard_url_builder(request)))


@router.get("/{job_id}/errors", response_model=ErrorList)
def job_errors(job_id: str, db: Db) -> ErrorList:
    return ErrorList(errors=JobService(db).errors(job_id))
