"""The shapes of resource ids, so a caller's id is checked before anything is looked up.

Ids are minted here, as a prefix and a uuid4's 32 hex digits. Anything else (a path, `..`, a NUL
byte, ten kilobytes of text) cannot name a row and never reaches the database or storage.
"""

from __future__ import annotations

import uuid

PREFIXES = {"job": "job_", "shard": "shd_", "file": "file-", "batch": "batch_"}


def id_pattern(kind: str) -> str:
    """The id's regular expression, anchored; also valid as an OpenAPI (ECMA-262) pattern
    (the prefixes hold no metacharacters, so they go in unescaped)."""
    return f"^{PREFIXES[kind]}[0-9a-f]{{32}}$"


def new_id(kind: str) -> str:
    """A fresh id of this kind (job, shard, file, batch): unguessable, and matching id_pattern."""
    return f"{PREFIXES[kind]}{uuid.uuid4().hex}"
