"""Teachers, shard downloads, health and metrics."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Response
from fastapi.responses import FileResponse
from sqlalchemy import orm

from service.errors import NotFound, ShardDamaged, Unavailable
from service.http.deps import runtime, session
from service.http.metrics import render_metrics
from service.jobs.repository import JobRepository
from service.runtime import Runtime
from service.storage import ShardCheckFailed

router = APIRouter()
Db = Annotated[orm.Session, Depends(session)]
Rt = Annotated[Runtime, Depends(runtime)]
PARQUET = "application/vnd.apache.parquet"


@router.get("/v1/teachers", tags=["teachers"])
def list_teachers(rt: Rt, db: Db) -> dict:
    online = JobRepository(db).online_workers()
    return {"data": [{**t.describe(), "workers": online.get(t.name, 0)} for t in rt.teachers.available()]}


# HEAD too: fsspec's HTTP filesystem (HF datasets, pandas, polars) asks HEAD for the size and
# ETag, and on a 405 falls back to a GET that starts sending the whole file.
@router.api_route("/v1/shards/{shard_id}", methods=["GET", "HEAD"], tags=["shards"], response_class=FileResponse)
def download_shard(shard_id: str, rt: Rt, db: Db) -> FileResponse:
    shard = JobRepository(db).shard(shard_id)
    if shard is None or shard.kind != "job":
        raise NotFound(f"no shard {shard_id!r}", field="shard_id")
    try:
        path = rt.storage.verified_local_path(shard.path, shard.bytes, shard.sha256)
    except ShardCheckFailed as exc:  # never serve a damaged file as good
        raise ShardDamaged(f"shard {shard_id} failed its integrity check: {exc}", field="shard_id") from exc
    headers = {"ETag": f'"{shard.sha256}"', "X-Content-SHA256": shard.sha256, "Cache-Control": "private, max-age=86400"}
    return FileResponse(path, media_type=PARQUET, headers=headers, filename=f"{shard.job_id}-{shard.shard_index:05d}.parquet")


@router.get("/healthz", tags=["health"])
def healthz(rt: Rt) -> dict:
    try:
        with rt.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as exc:
        raise Unavailable("database unreachable") from exc
    return {"status": "ok"}


@router.get("/metrics", tags=["health"])
def metrics(db: Db, rt: Rt) -> Response:
    return Response(render_metrics(JobRepository(db), rt.teachers.prices), media_type="text/plain; version=0.0.4")
