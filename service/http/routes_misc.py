"""Teachers, shard downloads, health and metrics. Only /healthz answers without an API key."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse

from service.db import database_answers
from service.errors import ShardDamaged, Unavailable
from service.http.deps import Db, Jobs, Rt, caller
from service.http.params import ShardId
from service.http.ranges import RANGE_HEADERS, RangeFileResponse, StoredFileResponse, file_responses
from service.status.metrics import render_metrics
from service.storage import ShardCheckFailed
from service.teachers.service import available_teachers

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(caller)])
health_router = APIRouter()
PARQUET = "application/vnd.apache.parquet"


@router.get("/v1/teachers", tags=["teachers"])
def list_teachers(rt: Rt, db: Db) -> dict[str, Any]:
    return {"data": available_teachers(rt.teachers, db)}


SHARD_DOWNLOAD: dict[str, Any] = {"tags": ["shards"], "response_class": RangeFileResponse,
                  "responses": {**file_responses(PARQUET),
                                307: {"description": "on an object store: a short-lived presigned URL of the file"}},
                  "openapi_extra": RANGE_HEADERS}


# HEAD too (its own operation in the schema): fsspec's HTTP filesystem (HF datasets, pandas,
# polars) asks HEAD for the size and ETag, and on a 405 falls back to a GET that starts sending
# the whole file. Ranges: ranges.py.
@router.get("/v1/shards/{shard_id}", **SHARD_DOWNLOAD)
@router.head("/v1/shards/{shard_id}", **SHARD_DOWNLOAD)
def download_shard(shard_id: ShardId, request: Request, rt: Rt, jobs: Jobs) -> Response:
    shard = jobs.shard(shard_id)
    filename = f"{shard.job_id}-{shard.shard_index:05d}.parquet"
    # Only a GET is redirected: a presigned URL is signed for GET, and a HEAD (fsspec asks one
    # for the size before its ranged GETs) is answered here from the index, without a body.
    head = request.method == "HEAD"
    redirect = rt.settings.storage_download == "redirect" and not head
    url = rt.storage.download_url(shard.path, filename, PARQUET, rt.settings.presign_expires_s) if redirect else None
    try:
        # Redirected, the client checks the manifest's sha256 itself: the API only checks the
        # object is there with its size (a HEAD on S3), never reads it. Served, it is hashed once.
        rt.storage.verify(shard.path, shard.bytes, shard.sha256, full=url is None and not head)
    except ShardCheckFailed as exc:  # never serve a damaged file as good; its storage path stays in the log
        log.error("shard %s failed its integrity check: %s", shard_id, exc)
        raise ShardDamaged(f"shard {shard_id} failed its integrity check", field="shard_id") from exc
    headers = {"ETag": f'"{shard.sha256}"', "X-Content-SHA256": shard.sha256}
    if url is not None:  # short-lived and per caller: never cached by a proxy
        return RedirectResponse(url, status_code=307, headers={**headers, "Cache-Control": "private, no-store"})
    headers["Cache-Control"] = "private, max-age=86400"
    local = rt.storage.local_path(shard.path)
    if local is not None:
        return RangeFileResponse(local, media_type=PARQUET, headers=headers, filename=filename)
    return StoredFileResponse(lambda: rt.storage.open(shard.path), shard.bytes, media_type=PARQUET,
                              headers=headers, filename=filename)


@health_router.get("/healthz", tags=["health"])
async def healthz(request: Request) -> dict[str, str]:
    # Async, on its own connection, with no sync dependency (those run in the threadpool): a
    # probe must answer while the worker threadpool (or the connection pool) is saturated, and
    # must never block the event loop on the database.
    if not await database_answers(request.app.state.runtime.database_url):
        raise Unavailable("database unreachable")
    return {"status": "ok"}


# The default response class keeps the error responses documented as JSON; 200 is text.
@router.get("/metrics", tags=["health"],
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}})
def metrics(db: Db, rt: Rt) -> Response:
    return Response(render_metrics(db, rt.teachers.prices), media_type="text/plain; version=0.0.4")
