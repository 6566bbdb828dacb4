"""What one submission may ask for. Each limit is a setting; a refusal names it and its value."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.errors import LimitExceeded, RateLimited, ValidationFailed
from service.jobs.schemas import JobCreate, RequestIn
from service.jobs.tokenize import PreparedRequest, RejectedRequest, parameter_field
from service.settings import ServiceSettings


@dataclass(frozen=True)
class JobLimits:
    """The submission limits of ServiceSettings (documented there, with their defaults); a
    tenant's own values (`teachercache tenants set-limit`) replace them for that tenant."""

    max_requests_per_job: int
    max_tokens_per_job: int
    max_top_logprobs: int
    max_completion_tokens: int
    max_pending_requests_per_tenant: int
    submissions_per_minute: float
    submission_burst: int
    max_text_chars: int

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> JobLimits:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})

    @classmethod
    def defaults(cls) -> JobLimits:
        return cls.from_settings(ServiceSettings.model_construct())  # the defaults, not the environment

    def for_tenant(self, overrides: dict[str, Any]) -> JobLimits:
        """These limits with the tenant's own values in place (unknown names are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if k in LIMIT_NAMES})


LIMIT_NAMES = frozenset(field.name for field in dataclasses.fields(JobLimits))


def check_limit_name(name: str) -> None:
    if name not in LIMIT_NAMES:
        raise ValidationFailed(f"limit: {name!r} is not a per-tenant limit (one of {sorted(LIMIT_NAMES)})",
                               field="limit")


def check_limit_value(name: str, value: float) -> Any:
    """A tenant override as the limit's own type; refused when unknown or not positive."""
    check_limit_name(name)
    kind = {f.name: f.type for f in dataclasses.fields(JobLimits)}[name]
    typed = float(value) if kind == "float" else int(value)
    if typed <= 0 or typed != value:
        raise ValidationFailed(f"{name}: {value!r} must be a positive {kind}", field=name)
    return typed


def over(limit: str, maximum: int, message: str, field: str) -> LimitExceeded:
    return LimitExceeded(f"{field}: {message} (limit {limit} = {maximum})", limit=limit, maximum=maximum, field=field)


def check_shape(body: JobCreate, limits: JobLimits) -> None:
    """Before any tokenization: the batch size (of a body; a file's is counted as it is read) and
    the job's default parameters."""
    if body.requests is not None:
        check_request_count(len(body.requests), limits)
    check_job_parameters(body, limits)


def check_request_count(count: int, limits: JobLimits) -> None:
    if count > limits.max_requests_per_job:
        raise over("max_requests_per_job", limits.max_requests_per_job, f"{count} requests in one job", "requests")


def check_job_parameters(body: JobCreate, limits: JobLimits) -> None:
    check_parameter_limits(body.top_logprobs, body.sampling.max_tokens, "top_logprobs", "sampling.max_tokens",
                           limits)


def check_parameter_limits(top_logprobs: int, max_tokens: int, top_field: str, max_tokens_field: str,
                           limits: JobLimits) -> None:
    if top_logprobs > limits.max_top_logprobs:
        raise over("max_top_logprobs", limits.max_top_logprobs, f"{top_logprobs} is above the maximum", top_field)
    if max_tokens > limits.max_completion_tokens:
        raise over("max_completion_tokens", limits.max_completion_tokens, f"{max_tokens} is above the maximum",
                   max_tokens_field)


def request_checks(body: JobCreate, limits: JobLimits) -> Callable[[int, RequestIn], None]:
    """What is checked of each request before it is tokenized: its texts' lengths and its own
    parameters (a 200 MB prompt would hold the teacher's tokenizer for seconds)."""
    def check(index: int, request: RequestIn) -> None:
        check_request_texts(index, request, limits)
        if request.top_logprobs is not None or request.sampling is not None:
            top = request.top_logprobs if request.top_logprobs is not None else body.top_logprobs
            max_tokens = (request.sampling and request.sampling.max_tokens) or body.sampling.max_tokens
            try:
                check_parameter_limits(top, max_tokens, parameter_field(index, request, "top_logprobs"),
                                       parameter_field(index, request, "max_tokens"), limits)
            except LimitExceeded as error:
                error.details["request_index"] = index
                raise
    return check


def texts(request: RequestIn) -> list[tuple[str, str]]:
    """(field, text) of every free text of a request that the tokenizer would read (none, at
    once, for the token-id requests of a 10^7-request file)."""
    found = []
    if request.prompt:
        found.append(("prompt", request.prompt))
    if request.response:
        found.append(("response", request.response))
    if request.messages:
        found += [(f"messages[{i}].content", m.content) for i, m in enumerate(request.messages)]
    return found


def check_text_lengths(body: JobCreate, limits: JobLimits) -> None:
    """Before any tokenization: a 200 MB prompt would hold the teacher's tokenizer (and every
    other submission to that teacher) for seconds before its token count could refuse it."""
    for index, request in enumerate(body.requests or ()):
        check_request_texts(index, request, limits)


def check_request_texts(index: int, request: RequestIn, limits: JobLimits) -> None:
    for name, text in texts(request):
        if len(text) > limits.max_text_chars:
            error = over("max_text_chars", limits.max_text_chars, f"{len(text)} characters",
                         f"requests[{index}].{name}")
            error.details["request_index"] = index
            raise error


def request_tokens(body: JobCreate, request: PreparedRequest | RejectedRequest) -> int:
    """The most teacher tokens one request can cost: its prompt plus the response to score or
    generate, with its own sampling (a request refused alone costs nothing)."""
    if not isinstance(request, PreparedRequest):
        return 0
    if body.mode == "score":
        return len(request.prompt_token_ids) + len(request.response_token_ids or ())
    return len(request.prompt_token_ids) + request.sampling.max_tokens * request.sampling.n


def job_tokens(body: JobCreate, prepared: list[PreparedRequest | RejectedRequest]) -> int:
    """The most teacher tokens the job can cost: prompts plus the responses to score or generate."""
    return sum(request_tokens(body, r) for r in prepared)


def check_tokens(body: JobCreate, prepared: list[PreparedRequest | RejectedRequest], limits: JobLimits) -> None:
    check_token_total(job_tokens(body, prepared), limits)


def check_token_total(tokens: int, limits: JobLimits) -> None:
    if tokens > limits.max_tokens_per_job:
        raise over("max_tokens_per_job", limits.max_tokens_per_job,
                   f"the job may cost {tokens} teacher tokens (prompts + max_tokens x n, or + responses)",
                   "requests")


def check_pending(tenant: str, pending: int, new: int, limits: JobLimits) -> None:
    """Concurrent pending requests of one tenant: refused with 429 until some finish."""
    if pending + new > limits.max_pending_requests_per_tenant:
        raise RateLimited(
            f"tenant {tenant!r} would have {pending + new} requests pending "
            f"(limit max_pending_requests_per_tenant = {limits.max_pending_requests_per_tenant}); "
            "retry when some have finished",
            limit="max_pending_requests_per_tenant", maximum=limits.max_pending_requests_per_tenant,
            retry_after_s=30, field="requests", pending=pending,
        )
