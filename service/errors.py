"""One error base class; the HTTP layer renders every subclass the same way.

Each HTTP status has its own class, so `except` names the case it handles and never has to look
at `status_code`::

    TeachercacheError          500 internal_error (and the base: catch it to catch them all)
    ├── Unauthenticated        401 unauthenticated        (with WWW-Authenticate)
    ├── NotFound               404 not_found
    ├── MethodNotAllowed       405 method_not_allowed     (Starlette's, re-shaped)
    ├── Conflict               409 conflict
    ├── PayloadTooLarge        413 limit_exceeded         a body over its size limit
    ├── RangeNotSatisfiable    416 range_not_satisfiable  (with Content-Range)
    ├── MisdirectedRequest     421 misdirected_request
    ├── ValidationFailed       422 invalid_request        the input is wrong (field, line)
    ├── LimitExceeded          422 limit_exceeded         the input is right but over a configured limit
    ├── RateLimited            429 limit_exceeded         the tenant has too much in flight or submits too often (Retry-After)
    ├── ShardDamaged           500 shard_damaged
    └── Unavailable            503 unavailable            (with Retry-After)

The three limit errors name the setting (`limit`) and its value (`max`) in the body; the client
maps 413, 422 and 429 to its own classes (teachercache/errors.py) by status.
"""

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


class _NamesALimit(TeachercacheError):
    """Refused by a configured limit: the body names the setting (`limit`) and its value (`max`)."""

    code = "limit_exceeded"

    def __init__(self, message: str, *, limit: str, maximum: float, **details: Any) -> None:
        super().__init__(message, limit=limit, max=maximum, **details)


class LimitExceeded(_NamesALimit):
    """What a job asks is over a limit (requests, tokens, top_logprobs, max_tokens)."""

    status_code = 422


class PayloadTooLarge(_NamesALimit):
    """The request body is over its size limit."""

    status_code = 413


class RateLimited(_NamesALimit):
    """The tenant has too much in flight, or submits too often: retry after `retry_after_s`."""

    status_code = 429

    def __init__(self, message: str, *, limit: str, maximum: float, retry_after_s: float, **details: Any) -> None:
        super().__init__(message, limit=limit, maximum=maximum, **details)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
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


class OpenAIError(TeachercacheError):
    """An error of the OpenAI/vLLM-compatible endpoints (service/online), in the shape vLLM's
    server answers, so a trainer's client reads it as it reads vLLM's:
    `{"error": {"message", "type", "param", "code"}}` with the status as `code`."""

    status_code = 400
    code = "BadRequestError"

    def __init__(self, message: str, param: str | None = None, status: int | None = None,
                 type_name: str | None = None) -> None:
        super().__init__(message, param=param)
        self.param = param
        if status is not None:
            self.status_code = status
        if type_name is not None:
            self.code = type_name
        self.retry_headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        return self.retry_headers

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.code, "param": self.param,
                          "code": self.status_code}}

    @classmethod
    def of(cls, exc: TeachercacheError) -> OpenAIError:
        """One of the service's own errors in vLLM's shape: what vLLM refuses with 400 (a
        validation error or a limit: 422 here) is a 400; the rest keep their status."""
        if isinstance(exc, OpenAIError):
            return exc
        field = exc.details.get("field")
        param = str(field) if field is not None else None
        if isinstance(exc, ValidationFailed | LimitExceeded):
            return cls(exc.message, param)
        names = {401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError",
                 429: "RateLimitError", 503: "ServiceUnavailableError"}
        error = cls(exc.message, param, exc.status_code, names.get(exc.status_code, "InternalServerError"))
        error.retry_headers = exc.headers
        return error
