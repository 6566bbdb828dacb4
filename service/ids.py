"""The shapes of resource ids, so a caller's id is checked before anything is looked up.

Ids are minted as a prefix and a uuid4's 32 hex digits (`new_id` in service/jobs/service.py,
the files and batches in service/openai_batch/service.py). Anything else (a path, `..`, a NUL
byte, ten kilobytes of text) cannot name a row and never reaches the database or storage.
"""

from __future__ import annotations

import re

PREFIXES = {"job": "job_", "shard": "shd_", "file": "file-", "batch": "batch_"}


def id_pattern(kind: str) -> str:
    """The id's regular expression, anchored; also valid as an OpenAPI (ECMA-262) pattern
    (the prefixes hold no metacharacters, so they go in unescaped)."""
    return f"^{PREFIXES[kind]}[0-9a-f]{{32}}$"


def is_id(kind: str, value: str) -> bool:
    return re.fullmatch(id_pattern(kind), value) is not None
