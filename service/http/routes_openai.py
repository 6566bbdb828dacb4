"""OpenAI-compatible Files and Batches endpoints (the subset the Batch API needs), per tenant."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, Query, Request, Response, UploadFile

from service.http.deps import Batches, Rt, caller
from service.http.json_body import body_schema, json_body
from service.http.params import BatchCursor, BatchId, FileCursor, FileId
from service.http.ranges import RANGE_HEADERS, RangeFileResponse, StoredFileResponse, file_responses
from service.openai_batch.schemas import BatchCreate, BatchList, BatchObject, FileDeleted, FileList, FileObject
from service.openai_batch.service import describe_batch, describe_file
from service.results.retention import remove_objects

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(caller)])
OCTET_STREAM = "application/octet-stream"


@router.post("/files", response_model=FileObject)
def upload_file(batches: Batches, file: Annotated[UploadFile, File()],
                purpose: Annotated[Literal["batch"], Form()]) -> FileObject:
    # Starlette has spooled the upload to a temporary file: it is copied from there, never read whole.
    return describe_file(batches.upload(file.filename or "upload.jsonl", purpose, file.file))


@router.get("/files", response_model=FileList)
def list_files(batches: Batches, limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               after: FileCursor = None, purpose: Annotated[str | None, Query(max_length=32)] = None,
               order: Literal["asc", "desc"] = "desc") -> FileList:
    files, has_more = batches.list_files(limit, after, purpose, order)
    data = [describe_file(f) for f in files]
    return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                    has_more=has_more)


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: FileId, rt: Rt, batches: Batches, background: BackgroundTasks) -> FileDeleted:
    path = batches.delete_file(file_id)
    background.add_task(remove_objects, rt.storage, [path])  # after the commit: the row goes first
    return FileDeleted(id=file_id)


@router.get("/files/{file_id}", response_model=FileObject)
def get_file(file_id: FileId, batches: Batches) -> FileObject:
    return describe_file(batches.file(file_id))


@router.get("/files/{file_id}/content", response_class=RangeFileResponse, responses=file_responses(OCTET_STREAM),
             openapi_extra=RANGE_HEADERS)
def file_content(file_id: FileId, rt: Rt, batches: Batches) -> Response:
    row = batches.file(file_id)
    path = rt.storage.local_path(row.path)
    if path is None:  # an object store: streamed through the API, ranges as ranged reads
        return StoredFileResponse(lambda: rt.storage.open(row.path), row.bytes, media_type=OCTET_STREAM)
    return RangeFileResponse(path, media_type=OCTET_STREAM)


@router.post("/batches", response_model=BatchObject, openapi_extra=body_schema(BatchCreate))
def create_batch(body: Annotated[BatchCreate, Depends(json_body(BatchCreate))], request: Request,
                 batches: Batches) -> BatchObject:
    """The body is parsed and validated off the event loop (json_body.py), as a job's is."""
    batch = describe_batch(batches.create(body))
    request.app.state.finalizer.wake()  # a batch answered wholly from the cache is ready at once
    return batch


@router.get("/batches", response_model=BatchList)
def list_batches(batches: Batches, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                 after: BatchCursor = None) -> BatchList:
    page, has_more = batches.list(limit, after)
    data = [describe_batch(b) for b in page]
    return BatchList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                     has_more=has_more)


@router.get("/batches/{batch_id}", response_model=BatchObject)
def get_batch(batch_id: BatchId, batches: Batches) -> BatchObject:
    return describe_batch(batches.sync(batches.get(batch_id, lock=True)))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(batch_id: BatchId, request: Request, batches: Batches) -> BatchObject:
    batch = describe_batch(batches.cancel(batch_id))
    request.app.state.finalizer.wake()
    return batch
