"""The exceptions the client raises.

Every exception derives from :class:`TeachercacheError`, so ``except TeachercacheError``
catches anything this package raises on purpose::

    TeachercacheError
    ├── APIError               the service answered with an error status
    │   ├── ValidationError    400 / 422: the request was rejected (also raised locally
    │   │                      for a malformed JSONL file, before anything is sent);
    │   │                      a configured limit has code "limit_exceeded" and ``limit``
    │   ├── AuthenticationError 401: no API key, or an unknown or revoked one
    │   ├── NotFoundError      404 (also another tenant's job, shard, file or batch)
    │   ├── PayloadTooLargeError 413: the body is over the service's max_body_bytes
    │   ├── ConflictError      409 (e.g. an Idempotency-Key reused with another body)
    │   ├── RateLimitError     429 (retried automatically before it reaches you)
    │   └── ServerError        5xx (502/503/504 are retried automatically)
    ├── TransportError         the network failed: connect/read errors, timeouts,
    │                          a response body cut short (retried automatically)
    ├── IntegrityError         a downloaded shard's sha256 differs from the manifest
    ├── ShardFormatError       a shard this version cannot read: an unknown schema
    │                          version or soft-label encoding, or damaged encoded data
    ├── JobFailedError         wait(..., raise_on_failure=True) saw failed/cancelled
    └── WaitTimeoutError       wait(..., timeout=...) ran out (also a TimeoutError)
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from typing import Any

import httpx


class TeachercacheError(Exception):
    """Base of every error this package raises."""


class APIError(TeachercacheError):
    """The service answered with a 4xx/5xx status.

    ``code`` and ``message`` come from the service's ``{"error": {"code", "message"}}``
    body; ``body`` is the whole decoded body (or the raw text when it was not JSON).
    ``status_code`` is None only for a :class:`ValidationError` raised locally.
    """

    def __init__(self, status_code: int | None, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status_code} {code}: {message}" if status_code else f"{code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.body = body
        # Seconds the server asked us to wait (Retry-After), when it said so.
        self.retry_after: float | None = None


class ValidationError(APIError):
    """The request was rejected as invalid (400/422), or a JSONL line is not an object.

    ``line_number`` (1-based) names the offending line of a JSONL file checked locally.
    """

    line_number: int | None = None


class AuthenticationError(APIError):
    """The API key is missing, unknown or revoked (401). Set ``api_key=`` or TEACHERCACHE_API_KEY."""


class PayloadTooLargeError(APIError):
    """The request body is larger than the service accepts (413); split the batch."""


class NotFoundError(APIError):
    """The job, shard or route does not exist (404)."""


class ConflictError(APIError):
    """The request conflicts with the current state (409)."""


class RateLimitError(APIError):
    """Too many requests (429); the client retries these, honouring Retry-After."""


class ServerError(APIError):
    """The service failed (5xx); 502/503/504 are retried before this is raised."""


class TransportError(TeachercacheError):
    """The request never got a complete answer: connection refused or dropped, timeout."""


class IntegrityError(TeachercacheError):
    """A downloaded file's sha256 is not the one the manifest promised."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(f"{path}: sha256 {actual} does not match the manifest's {expected}")
        self.path = path
        self.expected = expected
        self.actual = actual


class ShardFormatError(TeachercacheError):
    """A shard (or a table read from one) that this version of the client cannot decode.

    Raised for a schema version or soft-label encoding it does not know (upgrade the client),
    and for encoded soft labels that fail their checks (truncated or corrupt data is reported,
    never decoded into wrong numbers). ``where`` names the shard or file, when known.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class JobFailedError(TeachercacheError):
    """A waited-on job ended ``failed`` or ``cancelled``; ``job`` is its final state."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job.get('id')} ended {job.get('status')}")
        self.job = job


class WaitTimeoutError(TeachercacheError, TimeoutError):
    """wait() gave up before the job finished; ``job`` is the last state seen."""

    def __init__(self, job: dict[str, Any], timeout: float) -> None:
        super().__init__(f"job {job.get('id')} still {job.get('status')} after {timeout}s")
        self.job = job


_ERROR_BY_STATUS: dict[int, type[APIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    409: ConflictError,
    422: ValidationError,
    429: RateLimitError,
}


def error_class_for(status_code: int) -> type[APIError]:
    """The APIError subclass that stands for an HTTP error status."""
    if status_code >= 500:
        return ServerError
    return _ERROR_BY_STATUS.get(status_code, APIError)


def error_from_response(response: httpx.Response) -> APIError:
    """Build the exception for an error response (its body must already be read)."""
    body = _decoded_body(response)
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        code = str(detail.get("code") or "error")
        message = str(detail.get("message") or response.reason_phrase)
    else:
        # Not our service's error shape (a proxy's HTML page, FastAPI's {"detail": ...}).
        code, message = "http_error", _short_text(body) or response.reason_phrase
    error = error_class_for(response.status_code)(response.status_code, code, message, body)
    error.retry_after = parse_retry_after(response.headers.get("retry-after"))
    return error


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or
    unreadable. (The workers' remote-teacher client uses it too.)"""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


def _decoded_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _short_text(body: Any) -> str:
    text = body if isinstance(body, str) else str(body)
    return text.strip()[:500]
