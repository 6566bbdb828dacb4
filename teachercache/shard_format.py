"""The row format of teachercache's Parquet shards: columns, Arrow types, file metadata, schema version.

This is the one definition of the wire format. The service writes it (a worker's result shards,
a job's assembled shards) and every reader checks it (``tc.stream``, ``ShardDataset``, the
service's own assembly). It lives in the client package, not in ``service/``, because readers
run on student machines that install the client alone (no database driver, no engine), while
the server always has the client package beside it (one distribution): so the server imports
the format from here, never the other way round.

A shard's file metadata carries ``teachercache.schema_version``; a reader refuses a version it
does not know with :class:`~teachercache.errors.ShardFormatError` rather than guess at columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from teachercache.errors import ShardFormatError
from teachercache.soft_labels import (
    FORMAT_SCHEMA_VERSIONS,
    SCHEMA_VERSION_KEY,
    decode,
    encoding_of,
    stored_columns,
)

# Bumped when a column changes meaning or type in a way an older reader would misread.
# 1: the float32 columns only. 2: job shards may store their soft labels in another encoding,
# named by teachercache.soft_labels (teachercache/soft_labels.py); without it, float32.
# 3: written only by job shards in compact layout 2 (soft_labels.FORMAT_SCHEMA_VERSIONS), so that
# readers from before it refuse them with "upgrade" while every other shard stays readable.
SCHEMA_VERSION = "2"
# The versions this reader understands.
READABLE_VERSIONS = frozenset({"1", SCHEMA_VERSION, *FORMAT_SCHEMA_VERSIONS.values()})

METADATA_PREFIX = "teachercache."
LOGPROBS_MODE_KEY = b"teachercache.logprobs_mode"
# Logprobs are the teacher's raw distribution (temperature 1, before penalties).
LOGPROBS_MODE = "raw"

# Columns every row carries, computed by the teacher (or recording its error).
RESULT_FIELDS = [
    pa.field("sample_index", pa.int32()),
    pa.field("prompt_token_ids", pa.list_(pa.int32())),
    pa.field("completion_token_ids", pa.list_(pa.int32())),
    pa.field("completion_text", pa.string()),
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("top_token_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("top_logprobs", pa.list_(pa.list_(pa.float32()))),
    # Sampled soft labels (a job of soft-label kind "sampled"; null otherwise): per position the
    # unique token ids drawn from the full raw distribution, most drawn first, and their counts
    # (summing to the draws). Result shards written before these columns existed lack them;
    # assembly fills them with nulls.
    pa.field("sample_token_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("sample_counts", pa.list_(pa.list_(pa.int32()))),
    pa.field("finish_reason", pa.string()),
    pa.field("error", pa.string()),
]
SAMPLED_COLUMNS = ("sample_token_ids", "sample_counts")
# A worker's result shard: rows keyed by cache key, shared by every job that asks for them. It
# also keeps what the synchronous endpoints answer as vLLM does and job shards do not carry: each
# token's rank in the teacher's whole vocabulary (1 = most likely; vLLM's `rank`), and vLLM's
# `stop_reason` of a sample that a stop string (`stop_string`) or stop token (`stop_token_id`)
# ended. Null where the engine gives none; absent from shards written before the column existed.
RESULT_EXTRA_FIELDS = [
    pa.field("token_ranks", pa.list_(pa.int32())),
    pa.field("stop_string", pa.string()),
    pa.field("stop_token_id", pa.int32()),
]
RESULT_SCHEMA = pa.schema([pa.field("cache_key", pa.string()), *RESULT_FIELDS, *RESULT_EXTRA_FIELDS])
# The columns a job adds around the teacher's: which request a row answers, and whether it was cached.
JOB_FIELDS_BEFORE = [pa.field("custom_id", pa.string()), pa.field("request_index", pa.int32())]
JOB_FIELDS_AFTER = [
    pa.field("cached", pa.bool_()),
    # The request's own parameters as JSON ({"sampling": {...}, "top_logprobs": k}) where they
    # differ from the job's (the shard metadata's); null for a request that ran with the job's.
    pa.field("parameters", pa.string()),
]
# Derived when a job shard is written (from the cache's float32 top-k, so every cached row has it):
# per position log(1 - sum of the top-k probabilities), the "ghost token" (soft_labels.tail_logprobs).
TAIL_FIELD = pa.field("tail_logprob", pa.list_(pa.float32()))
# A job's output shard: the contract's columns (DESIGN.md), in request order.
JOB_SCHEMA = pa.schema([*JOB_FIELDS_BEFORE, *RESULT_FIELDS, TAIL_FIELD, *JOB_FIELDS_AFTER])


# Soft-label columns are numbers whose bytes compress far better split into byte planes
# (Parquet's BYTE_STREAM_SPLIT encoding, which any Parquet reader decodes) than whole.
SPLIT_TYPES = (pa.float32(), pa.float16(), pa.int32(), pa.uint32())
SPLIT_COLUMNS = ("token_logprobs", "top_token_ids", "top_logprobs", "top_logprob_ref", "top_logprob_steps",
                 "token_logprob_steps", "tail_logprob", "sample_token_ids", "sample_counts", "sample_token_codes",
                 "sample_count_values", "top_token_codes", "top_logprob_ref_codes", "top_logprob_codes",
                 "token_logprob_codes")
COMPRESSION_LEVEL = 6  # zstd: most of level 19's gain on these columns, at a fraction of its time


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """pq.ParquetWriter options for a shard of `schema`: zstd, byte-stream-split soft labels,
    dictionaries for the rest, and page checksums (a flipped byte fails the read)."""
    split = [path for field in schema if field.name in SPLIT_COLUMNS for path in _leaf_paths(field)]
    others = [field.name for field in schema if field.name not in SPLIT_COLUMNS]
    return {"compression": "zstd", "compression_level": COMPRESSION_LEVEL, "use_byte_stream_split": split,
            "use_dictionary": others, "write_page_checksum": True}


def _leaf_paths(field: pa.Field) -> list[str]:
    path, type_ = field.name, field.type
    while pa.types.is_list(type_):
        path, type_ = f"{path}.list.element", type_.value_type
    return [path] if type_ in SPLIT_TYPES else []


def shard_metadata(values: dict[str, Any]) -> dict[bytes, bytes]:
    """File-level key/value metadata: the schema version, the logprob mode, and `values`
    (teacher identity, parameters), each under ``teachercache.<name>`` (non-strings as JSON)."""
    meta = {
        SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode(),
        LOGPROBS_MODE_KEY: LOGPROBS_MODE.encode(),
    }
    for name, value in values.items():
        meta[f"{METADATA_PREFIX}{name}".encode()] = (value if isinstance(value, str) else json.dumps(value)).encode()
    return meta


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


@dataclass(frozen=True)
class ShardInfo:
    """What a reader needs to know about a shard before it reads a row."""

    schema_version: str
    metadata: dict[str, str]  # every teachercache.* key, prefix removed, values as written


def check_schema(schema: pa.Schema, where: str | None = None) -> ShardInfo:
    """The shard's format as its metadata states it; an unknown (or missing) schema version is
    refused with ShardFormatError, so a reader never misreads a format it does not know."""
    raw = schema.metadata or {}
    version = raw.get(SCHEMA_VERSION_KEY)
    if version is None:
        raise ShardFormatError("not a teachercache shard: no teachercache.schema_version in its metadata", where)
    version_text = version.decode(errors="replace")
    if version_text not in READABLE_VERSIONS:
        known = ", ".join(sorted(READABLE_VERSIONS))
        raise ShardFormatError(
            f"shard schema version {version_text!r} is not one this reader knows ({known}): "
            "upgrade the teachercache client", where)
    prefix = METADATA_PREFIX.encode()
    metadata = {k[len(prefix):].decode(errors="replace"): v.decode(errors="replace")
                for k, v in raw.items() if k.startswith(prefix)}
    return ShardInfo(schema_version=version_text, metadata=metadata)


def open_shard(source: Any, where: str | None = None, **options: Any) -> tuple[pq.ParquetFile, ShardInfo]:
    """A ParquetFile over `source` (a path or file object) whose format has been checked; pages
    that carry a checksum are verified as they are read."""
    parquet = pq.ParquetFile(source, page_checksum_verification=True, **options)
    return parquet, check_schema(parquet.schema_arrow, where or _name_of(source))


def _name_of(source: Any) -> str | None:
    if isinstance(source, str):
        return source
    name = getattr(source, "name", None) or getattr(source, "url", None)
    return str(name) if name is not None else None


def read_table(source: Any, columns: list[str] | None = None) -> pa.Table:
    """A whole shard from a path or file (a downloaded one, say): its format checked and its
    soft labels decoded into the float32 columns, whatever encoding its job chose."""
    parquet, _ = open_shard(source)
    where = _name_of(source)
    encoding = encoding_of(parquet.schema_arrow.metadata, where)
    table = parquet.read(columns=stored_columns(columns, encoding))
    return decode(table, encoding, where, columns)
