"""The error tree: one class per HTTP status under the one base, so `except` never checks a status."""

import inspect

import pytest

from service import errors
from service.errors import LimitExceeded, PayloadTooLarge, RateLimited, TeachercacheError, ValidationFailed


def error_classes() -> list[type[TeachercacheError]]:
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, TeachercacheError) and not cls.__name__.startswith("_")]


def test_each_status_and_code_has_exactly_one_class():
    kinds = [(cls.status_code, cls.code) for cls in error_classes()]
    assert sorted(kinds) == sorted(set(kinds))
    limits = {cls.status_code for cls in error_classes() if cls.code == "limit_exceeded"}
    assert limits == {413, 422, 429}


def test_no_error_class_is_a_kind_of_another():
    """A 429 caught as a 422 was the bug: every class stands on the base alone."""
    classes = error_classes()
    for cls in classes:
        for other in classes:
            if other is not cls and other is not TeachercacheError:
                assert not issubclass(cls, other), f"{cls.__name__} is a {other.__name__}"


@pytest.mark.parametrize("error, status", [
    (LimitExceeded("over", limit="max_requests_per_job", maximum=3), 422),
    (PayloadTooLarge("big", limit="max_body_bytes", maximum=10), 413),
    (RateLimited("slow down", limit="submissions_per_minute", maximum=6, retry_after_s=2.5), 429),
])
def test_limit_errors_name_the_setting_and_its_value(error, status):
    assert error.status_code == status and not isinstance(error, ValidationFailed)
    assert error.to_dict()["error"] | {"message": None} == {"code": "limit_exceeded", "message": None,
                                                          "limit": error.details["limit"],
                                                          "max": error.details["max"]}


def test_only_a_rate_limit_says_when_to_retry():
    assert RateLimited("x", limit="l", maximum=1, retry_after_s=2.5).headers == {"Retry-After": "3"}
    assert LimitExceeded("x", limit="l", maximum=1).headers is None
