"""One error base class; the HTTP layer renders every subclass the same way."""

from __future__ import annotations

import math
from typing import Any


class TeachercacheError(Exception):
    """Base of every error the service reports to a caller."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def headers(self) -> dict[str, str] | None:
        """HTTP headers that go with the error (Retry-After, WWW-Authenticate, Content-Range)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class ValidationFailed(TeachercacheError):
    status_code = 422
    code = "invalid_request"


class Unauthenticated(TeachercacheError):
    """No API key, or one that is unknown or revoked. The message never echoes the key."""

    status_code = 401
    code = "unauthenticated"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="teachercache"'}


class LimitExceeded(ValidationFailed):
    """A configured limit refused the request; `limit` names the setting, `max` its value.

    422 for what a job asks (requests, tokens, top_logprobs, max_tokens), 413 for the body,
    429 (with Retry-After) for what the tenant has in flight or submits too often.
    """

    code = "limit_exceeded"

    def __init__(self, message: str, *, limit: str, maximum: float, status_code: int = 422,
                 retry_after_s: float | None = None, **details: Any) -> None:
        super().__init__(message, limit=limit, max=maximum, **details)
        self.status_code = status_code
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class NotFound(TeachercacheError):
    status_code = 404
    code = "not_found"


class MethodNotAllowed(TeachercacheError):
    status_code = 405
    code = "method_not_allowed"


class Conflict(TeachercacheError):
    status_code = 409
    code = "conflict"


class MethodNotAllowed(TeachercacheError):
    status_code = 405
    code = "method_not_allowed"


class MisdirectedRequest(TeachercacheError):
    """In production, a request whose Host header is not trusted to build URLs from."""

    status_code = 421
    code = "misdirected_request"


class Unavailable(TeachercacheError):
    status_code = 503
    code = "unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class RangeNotSatisfiable(TeachercacheError):
    """No range of a Range header overlaps the file (RFC 9110 §15.5.17): 416 with `bytes */size`."""

    status_code = 416
    code = "range_not_satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"no requested range overlaps the {size} bytes of this file", field="Range")
        self.size = size

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


class ShardDamaged(TeachercacheError):
    """A stored shard no longer matches its index entry: reported, never served."""

    status_code = 500
    code = "shard_damaged"
