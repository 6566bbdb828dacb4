"""The HTTP contract for jobs: what a submission may contain and what a job looks like."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.ids import id_pattern
from service.sampling import (
    INT32_MAX,
    MAX_DRAW_TEMPERATURE,
    MAX_DRAWS,
    MIN_DRAW_TEMPERATURE,
    Draws,
    Sampling,
    SamplingOverride,
    TokenId,
)
from service.states import JobStatus
from service.text import StorableJson, StorableText, UnicodeText
from teachercache.soft_labels import DEFAULT_ENCODING, ENCODINGS

__all__ = ["INT32_MAX", "Sampling", "SamplingOverride", "TokenId"]  # re-exported: the job contract uses them


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: UnicodeText


class RequestIn(Strict):
    """One prompt: exactly one of `prompt`, `messages`, `prompt_token_ids`.

    In score mode also a `response` or `response_token_ids`, unless `messages` is a whole
    conversation ending with the assistant's turn (that turn is then the response).
    """

    custom_id: StorableText | None = Field(default=None, max_length=512)
    prompt: UnicodeText | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt_token_ids: list[int] | None = Field(default=None, min_length=1)
    response: UnicodeText | None = None
    response_token_ids: list[int] | None = Field(default=None, min_length=1)
    # This request's own parameters: each one given replaces the job's (`sampling`, `top_logprobs`).
    sampling: SamplingOverride | None = None
    top_logprobs: int | None = Field(default=None, ge=0)


class SoftLabels(Strict):
    """What the job records beside each token and how its shards deliver it (the cache keeps
    float32 either way). `kind`: `topk` (the top-k and its tail mass; the default) or `sampled`
    (also `draws` tokens drawn with replacement from the full raw distribution at `temperature`
    per position, as ids and counts; `seed` seeds the draws' own generator)."""

    kind: Literal["topk", "sampled"] = "topk"
    draws: int | None = Field(default=None, ge=1, le=MAX_DRAWS, description="sampled: draws per position (50)")
    temperature: float | None = Field(default=None, ge=MIN_DRAW_TEMPERATURE, le=MAX_DRAW_TEMPERATURE,
                                      description="sampled: temperature of the distribution drawn from (1.0)")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="sampled: the draws' seed (0)")
    encoding: Literal[ENCODINGS] = Field(  # type: ignore[valid-type]
        default=DEFAULT_ENCODING, description="float32 (the contract's columns), float16, or compact "
        "(quantised logprobs, decoded by the client); see docs/soft-labels.md")

    @model_validator(mode="after")
    def _draws_only_when_sampled(self) -> SoftLabels:
        given = [name for name in ("draws", "temperature", "seed") if getattr(self, name) is not None]
        if self.kind == "topk" and given:
            raise ValueError(f"{', '.join(given)}: only for soft labels of kind 'sampled'")
        return self

    def stored(self) -> dict[str, Any]:
        """As the job keeps and shows it: the encoding, and for a sampled job its draws in full
        (defaults filled); a top-k job's is `{"encoding": ...}` as before sampled labels existed."""
        draws = self.sampled()
        if draws is None:
            return {"encoding": self.encoding}
        return {"kind": "sampled", **draws.model_dump(), "encoding": self.encoding}

    def sampled(self) -> Draws | None:
        """The draws a sampled job records at each position; None for top-k."""
        if self.kind != "sampled":
            return None
        given = {name: getattr(self, name) for name in ("draws", "temperature", "seed")}
        return Draws(**{name: value for name, value in given.items() if value is not None})


class JobCreate(Strict):
    teacher: str | None = Field(default=None, description="a registered teacher; the default when omitted")
    mode: Literal["generate", "score"] = "generate"
    top_logprobs: int = Field(default=20, ge=0)
    sampling: Sampling = Field(default_factory=Sampling)
    cache: Literal["use", "refresh", "bypass"] = "use"
    soft_labels: SoftLabels = Field(default_factory=SoftLabels)
    # One of the two: the requests themselves, or an uploaded JSONL file (`POST /v1/files`,
    # purpose `batch`) with one request object per line, read as a stream (any size).
    requests: list[RequestIn] | None = Field(default=None, min_length=1)
    input_file_id: str | None = Field(default=None, pattern=id_pattern("file"))
    metadata: StorableJson = Field(default_factory=dict)


class Counts(BaseModel):
    total: int
    completed: int
    cached: int
    failed: int
    pending: int
    cancelled: int = 0


class Spend(BaseModel):
    """What the job cost the teacher, and what the cache saved it (docs/remote-teachers.md)."""

    prompt_tokens_sent: int = 0
    completion_tokens_sent: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    # Only where the registry gives the teacher's prices (USD per million tokens).
    spent_usd: float | None = None
    saved_usd: float | None = None


class ShardOut(BaseModel):
    index: int
    url: str
    rows: int
    bytes: int
    sha256: str


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    teacher: str
    mode: str
    top_logprobs: int
    sampling: dict[str, Any]
    cache: str
    soft_labels: dict[str, Any] = Field(default_factory=lambda: {"encoding": DEFAULT_ENCODING})
    metadata: dict[str, Any]
    counts: Counts
    spend: Spend = Field(default_factory=Spend)
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None = None
    shards: list[ShardOut] | None = None


class JobList(BaseModel):
    data: list[JobOut]
    has_more: bool
    next: str | None


class ShardList(BaseModel):
    shards: list[ShardOut]


class RequestError(BaseModel):
    request_index: int
    custom_id: str
    error: str


class ErrorList(BaseModel):
    errors: list[RequestError]
    has_more: bool = False
    next: int | None = None  # pass as `after` for the next page
