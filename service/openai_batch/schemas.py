"""OpenAI's shapes for files and batches (as the official `openai` package parses them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from service.errors import ValidationFailed
from service.ids import id_pattern
from service.jobs.schemas import SoftLabels
from service.states import BatchStatus
from service.text import StorableText


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class OutputExpiresAfter(BaseModel):
    """OpenAI's expiration policy for a batch's output and error files (seconds after creation)."""

    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(ge=3600, le=30 * 24 * 3600)


# A batch's metadata key for its soft labels, e.g. '{"kind": "sampled", "draws": 50}'.
SOFT_LABELS_METADATA = "teachercache_soft_labels"


class BatchCreate(BaseModel):
    input_file_id: str = Field(pattern=id_pattern("file"))
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[StorableText, StorableText] | None = None
    output_expires_after: OutputExpiresAfter | None = None

    def soft_labels(self) -> SoftLabels:
        """The job's soft labels, from the metadata key SOFT_LABELS_METADATA (OpenAI's metadata
        values are strings: the native `soft_labels` object as JSON); top-k when absent."""
        text = (self.metadata or {}).get(SOFT_LABELS_METADATA)
        if text is None:
            return SoftLabels()
        try:
            return SoftLabels.model_validate_json(text)
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise ValidationFailed(f"metadata.{SOFT_LABELS_METADATA}: {detail}",
                                   field=f"metadata.{SOFT_LABELS_METADATA}") from None


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None  # 1-based line of the input file


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens of requests answered from the cache


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, Any] | None
    model: str | None = None
    usage: BatchUsage | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
