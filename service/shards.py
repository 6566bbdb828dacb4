"""The Parquet shard contract: columns, metadata, and how result rows become job rows."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1"

# Columns every row carries, computed by the teacher (or recording its error).
RESULT_FIELDS = [
    pa.field("sample_index", pa.int32()),
    pa.field("prompt_token_ids", pa.list_(pa.int32())),
    pa.field("completion_token_ids", pa.list_(pa.int32())),
    pa.field("completion_text", pa.string()),
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("top_token_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("top_logprobs", pa.list_(pa.list_(pa.float32()))),
    pa.field("finish_reason", pa.string()),
    pa.field("error", pa.string()),
]
# A worker's result shard: rows keyed by cache key, shared by every job that asks for them.
RESULT_SCHEMA = pa.schema([pa.field("cache_key", pa.string()), *RESULT_FIELDS])
# A job's output shard: the contract's columns, in request order.
JOB_SCHEMA = pa.schema(
    [
        pa.field("custom_id", pa.string()),
        pa.field("request_index", pa.int32()),
        *RESULT_FIELDS,
        pa.field("cached", pa.bool_()),
        # The request's own parameters as JSON ({"sampling": {...}, "top_logprobs": k}) where they
        # differ from the job's (the shard metadata's); null for a request that ran with the job's.
        pa.field("parameters", pa.string()),
    ]
)


def shard_metadata(job_like: dict[str, Any]) -> dict[bytes, bytes]:
    """File-level key/value metadata: teacher identity, parameters, logprob mode, schema version."""
    meta = {
        "teachercache.schema_version": SCHEMA_VERSION,
        "teachercache.logprobs_mode": "raw",
        **{f"teachercache.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in job_like.items()},
    }
    return {k.encode(): str(v).encode() for k, v in meta.items()}


def error_row(sample_index: int, prompt_token_ids: list[int], error: str) -> dict[str, Any]:
    """The row a failed request gets: its prompt, empty outputs and the reason."""
    return {
        "sample_index": sample_index,
        "prompt_token_ids": prompt_token_ids,
        "completion_token_ids": [],
        "completion_text": "",
        "token_logprobs": [],
        "top_token_ids": [],
        "top_logprobs": [],
        "finish_reason": "error",
        "error": error,
    }
