"""Submission limits on their own: each refusal names the limit, its value and the field; a
tenant's own values replace the service's; the token count is what the job may cost."""

from __future__ import annotations

import pytest

from service.errors import LimitExceeded, RateLimited, ValidationFailed
from service.jobs.limits import JobLimits, check_limit_value, check_pending, check_shape, check_tokens, job_tokens
from service.jobs.schemas import JobCreate
from service.jobs.tokenize import PreparedRequest

LIMITS = JobLimits(max_requests_per_job=3, max_tokens_per_job=100, max_top_logprobs=5, max_completion_tokens=16,
                   max_pending_requests_per_tenant=10, submissions_per_minute=60.0, submission_burst=2,
                   max_text_chars=100)


def body(n: int = 1, **extra) -> JobCreate:
    """A job within LIMITS but for what `extra` changes."""
    return JobCreate(requests=[{"prompt_token_ids": [1, 2]}] * n, **{"top_logprobs": 5, "sampling": {"max_tokens": 16},
                                                                   **extra})


def prepared(*lengths: int, response: int | None = None, job: JobCreate | None = None) -> list[PreparedRequest]:
    """Requests of these prompt lengths, run with `job`'s parameters."""
    sampling = (job or body()).sampling
    return [PreparedRequest(i, str(i), [1] * n, None if response is None else [2] * response, sampling=sampling)
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("job, limit, field", [
    (body(4), "max_requests_per_job", "requests"),
    (body(top_logprobs=6), "max_top_logprobs", "top_logprobs"),
    (body(sampling={"max_tokens": 17}), "max_completion_tokens", "sampling.max_tokens"),
])
def test_the_shape_of_a_job_is_checked_naming_the_limit(job, limit, field):
    with pytest.raises(LimitExceeded) as caught:
        check_shape(job, LIMITS)
    error = caught.value
    assert error.status_code == 422 and error.details["limit"] == limit and error.details["field"] == field
    assert error.details["max"] == getattr(LIMITS, limit) and f"{limit} = {getattr(LIMITS, limit)}" in error.message


def test_a_job_at_the_limits_passes():
    check_shape(body(3, top_logprobs=5, sampling={"max_tokens": 16}), LIMITS)


def test_job_tokens_are_prompts_plus_what_may_be_generated_or_scored():
    job = body(sampling={"max_tokens": 4, "n": 3})
    assert job_tokens(job, prepared(5, 7, job=job)) == 12 + 2 * 4 * 3
    assert job_tokens(body(mode="score"), prepared(5, 7, response=9)) == 12 + 18


def test_a_job_that_may_cost_too_many_tokens_is_refused():
    ten = body(sampling={"max_tokens": 10})
    check_tokens(ten, prepared(40, 40, job=ten), LIMITS.for_tenant({}))  # 80 + 20 = 100
    with pytest.raises(LimitExceeded, match="may cost 101 teacher tokens"):
        check_tokens(ten, prepared(40, 41, job=ten), LIMITS)


def test_pending_requests_of_a_tenant_are_a_429_with_retry_after():
    check_pending("alpha", 7, 3, LIMITS)
    with pytest.raises(RateLimited) as caught:
        check_pending("alpha", 8, 3, LIMITS)
    assert caught.value.status_code == 429 and caught.value.headers["Retry-After"] == "30"
    assert caught.value.details["pending"] == 8


def test_a_tenant_s_own_values_replace_the_service_s():
    own = LIMITS.for_tenant({"max_requests_per_job": 1000, "not_a_limit": 5})
    assert own.max_requests_per_job == 1000 and own.max_top_logprobs == LIMITS.max_top_logprobs
    check_shape(body(4), own)


@pytest.mark.parametrize("name, value", [("max_requests_per_job", 0), ("max_requests_per_job", 2.5),
                                         ("submission_burst", -1), ("max_body_bytes", 5), ("nonsense", 1)])
def test_a_tenant_limit_must_be_a_known_positive_value(name, value):
    with pytest.raises(ValidationFailed):
        check_limit_value(name, value)
    assert check_limit_value("submissions_per_minute", 2.5) == 2.5 and check_limit_value("submission_burst", 3) == 3


def test_the_defaults_are_the_settings_defaults_not_the_environment(monkeypatch):
    monkeypatch.setenv("TEACHERCACHE_MAX_TOP_LOGPROBS", "3")
    assert JobLimits.defaults().max_top_logprobs == 20
