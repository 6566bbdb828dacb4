"""Text and JSON a caller sends that Postgres (and the tokenizer) can take.

Python's json module turns `\\u0000` into a NUL character and `\\ud800` into a lone surrogate;
Postgres text and JSONB refuse the first, UTF-8 (the database, the tokenizer, our own JSON
answers) cannot encode the second. Both are refused when the request is validated, naming
the field, instead of failing halfway through writing a job.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator


def unicode_text(value: str) -> str:
    """Encodable as UTF-8: no lone surrogates (a tokenizer or a database would choke on them)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (it holds an unpaired surrogate)") from None
    return value


def storable_text(value: str) -> str:
    """Valid Unicode without NUL characters: what a Postgres text or JSONB value can hold."""
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return unicode_text(value)


MAX_JSON_DEPTH = 32


def storable_json(value: Any, depth: int = 0) -> Any:
    """A JSON value that Postgres JSONB stores as it was sent: storable strings (keys too),
    finite numbers (json.loads reads `NaN` and `Infinity`, which JSON cannot hold), and at most
    MAX_JSON_DEPTH levels (deeper values overflow the serializers that hash and answer it)."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"must not nest deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        storable_text(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must hold only finite numbers")
    elif isinstance(value, dict):
        for key, item in value.items():
            storable_text(key)
            storable_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            storable_json(item, depth + 1)
    return value


UnicodeText = Annotated[str, AfterValidator(unicode_text)]
StorableText = Annotated[str, AfterValidator(storable_text)]
StorableJson = Annotated[dict[str, Any], AfterValidator(storable_json)]
