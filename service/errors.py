"""One error base class; the HTTP layer renders every subclass the same way."""

from __future__ import annotations

from typing import Any


class TeachercacheError(Exception):
    """Base of every error the service reports to a caller."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class ValidationFailed(TeachercacheError):
    status_code = 422
    code = "invalid_request"


class NotFound(TeachercacheError):
    status_code = 404
    code = "not_found"


class Conflict(TeachercacheError):
    status_code = 409
    code = "conflict"


class Unavailable(TeachercacheError):
    status_code = 503
    code = "unavailable"


class ShardDamaged(TeachercacheError):
    """A stored shard no longer matches its index entry: reported, never served."""

    status_code = 500
    code = "shard_damaged"
