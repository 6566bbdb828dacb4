"""Soft-label encodings of job shards: what they store, and the one decoder every reader uses.

A job chooses how its soft labels (``token_logprobs``, ``top_token_ids``, ``top_logprobs``) are
delivered; the cache always keeps the teacher's float32 values exactly, and a job shard's
encoding is derived from them when the job is assembled.

- ``float32`` (default): the contract's columns (DESIGN.md), readable by any Parquet tool.
- ``float16``: ``token_logprobs`` and ``top_logprobs`` stored as half floats (Parquet FLOAT16).
  Decoded to float32; the error is float16's rounding: relative error at most 2^-11 (about
  4.9e-4) for |logprob| >= 6.1e-5, absolute at most 2^-25 below that; -inf stays -inf.
- ``compact``: ``top_token_ids`` exactly as float32 stores them (rank order, lossless), and
  logprobs quantised: per position a reference ``ref`` (the best finite top-k logprob, or the
  token's own logprob when there is no top-k) stored as float16, and every logprob as a whole
  number ``q`` of steps of ``STEP`` nats below the decoded ``ref``, delta-coded in rank order
  (zig-zag, uint32). Decoded ``ref - q * STEP``: at most ``STEP / 2`` = 1/32 nat from the
  teacher's value for every logprob but the reference itself, which is within float16's
  rounding (at most 2^-8 nat for |logprob| < 16). Differences to ``ref`` of more than
  ``MAX_DEPTH_NATS`` decode as -inf (their probability is 0 in float64). Top-k order is kept
  exactly (the ids are stored in rank order). Each row carries a checksum of its encoded
  values; a row whose data fails it, or whose structure is inconsistent, raises
  :class:`~teachercache.errors.ShardFormatError` instead of decoding into wrong numbers.

Readers (``tc.stream``, ``ShardDataset``, ``collate_topk`` on their rows) decode every encoding
into the float32 columns. For Hugging Face ``datasets``, Polars or plain pyarrow, read the
Parquet file and call :func:`decode_table` (``pyarrow.parquet.read_table(path)`` keeps the
file metadata that names the encoding)::

    import pyarrow.parquet as pq
    from teachercache.soft_labels import decode_table
    table = decode_table(pq.read_table("part-00000.parquet"))   # the float32 columns
    polars.from_arrow(table); datasets.Dataset(table)

The decoder is vectorised numpy over whole record batches (no Python loop per position).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from teachercache import sampled_codes
from teachercache.errors import ShardFormatError

ENCODINGS = ("float32", "float16", "compact")
DEFAULT_ENCODING = "float32"
SOFT_LABELS_KEY = b"teachercache.soft_labels"
# The shard schema version (shard_format.py) is defined here because a format can raise it: a
# reader from before compact layout 2 must refuse such a shard as "upgrade the client", not fail
# on missing columns; every other shard keeps the version it had.
SCHEMA_VERSION_KEY = b"teachercache.schema_version"
FORMAT_SCHEMA_VERSIONS = {"compact2": "3"}

# compact's quantisation: steps of 1/16 nat, so the rounding error is at most 1/32 nat.
STEP = 1.0 / 16.0
# Differences to the reference beyond this decode as -inf (exp(-2^20) is 0 even in float64).
MAX_DEPTH_NATS = float(2**20)
NEG_INF_CODE = np.uint32(0xFFFFFFFF)  # layout 1's -inf
# Layout 2's reference: whole steps of 1/256 nat (within 1/512), for logprobs of magnitude at most
# MAX_NATS (below: -inf), so every decoded value is a multiple of 1/256 that float32 holds exactly.
REF_STEP = 1.0 / 256.0
MAX_NATS = float(2**15)
# Layout 2's -inf: its step codes are int32 deltas stored as uint32, and no delta reaches 2^31.
NEG_INF_STEP = np.uint32(0x80000000)
# compact's layouts: 1 (a float16 reference per position, zig-zag steps below it, ids as they are)
# is still read; 2 is written (see _encode_compact).
COMPACT_LAYOUT = 2
COMPACT_LAYOUTS = (1, COMPACT_LAYOUT)
# A shard's id vocabulary keeps ids seen at least this often in the window it is fitted on: an id
# seen once costs more in the table than it saves in the column.
VOCABULARY_MIN_COUNT = 2
VOCABULARY_BAND = 256  # the ranks a code's low byte spans

SOFT_LABEL_COLUMNS = ("token_logprobs", "top_token_ids", "top_logprobs")
COMPACT_COLUMNS = ("top_token_ids", "top_logprob_ref", "top_logprob_steps", "token_logprob_steps",
                   "soft_label_checksum")
COMPACT2_COLUMNS = ("top_token_codes", "top_logprob_ref_codes", "top_logprob_codes", "token_logprob_codes",
                    "soft_label_checksum")
# The columns each format (an encoding at a layout: Encoding.format) stores in place of the float32
# ones (in this order, where they stood).
STORED_COLUMNS = {
    "float32": SOFT_LABEL_COLUMNS,
    "float16": SOFT_LABEL_COLUMNS,
    "compact": COMPACT_COLUMNS,
    "compact2": COMPACT2_COLUMNS,
}
STORED_TYPES = {
    "float32": {"token_logprobs": pa.list_(pa.float32()), "top_token_ids": pa.list_(pa.list_(pa.int32())),
                "top_logprobs": pa.list_(pa.list_(pa.float32()))},
    "float16": {"token_logprobs": pa.list_(pa.float16()), "top_token_ids": pa.list_(pa.list_(pa.int32())),
                "top_logprobs": pa.list_(pa.list_(pa.float16()))},
    "compact": {"top_token_ids": pa.list_(pa.list_(pa.int32())), "top_logprob_ref": pa.list_(pa.float16()),
                "top_logprob_steps": pa.list_(pa.list_(pa.uint32())),
                "token_logprob_steps": pa.list_(pa.uint32()), "soft_label_checksum": pa.uint32()},
    "compact2": {"top_token_codes": pa.list_(pa.list_(pa.int32())), "top_logprob_ref_codes": pa.list_(pa.uint32()),
                 "top_logprob_codes": pa.list_(pa.list_(pa.uint32())),
                 "token_logprob_codes": pa.list_(pa.uint32()), "soft_label_checksum": pa.uint32()},
}
FLOAT32_TYPES = STORED_TYPES["float32"]


@dataclass(frozen=True)
class Encoding:
    """A shard's soft-label encoding and its parameters, as its metadata records them. compact's
    `vocabulary` (layout 2) is the shard's frequent ids, most frequent first (see `fitted`)."""

    name: str = DEFAULT_ENCODING
    step: float | None = None
    layout: int | None = None
    vocabulary: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def named(cls, name: str) -> Encoding:
        if name not in ENCODINGS:
            raise ValueError(f"unknown soft-label encoding {name!r}; one of {', '.join(ENCODINGS)}")
        return cls(name, STEP, COMPACT_LAYOUT) if name == "compact" else cls(name)

    @property
    def format(self) -> str:
        """The key of STORED_COLUMNS / STORED_TYPES: the encoding, at its layout."""
        return "compact2" if self.name == "compact" and self.layout == 2 else self.name

    def fitted(self, table: pa.Table | pa.RecordBatch) -> Encoding:
        """This encoding with its parameters fitted to `table` (a shard's first window): for
        compact, the vocabulary of ids it codes by frequency rank. Other encodings: unchanged."""
        if self.format != "compact2" or "top_token_ids" not in table.schema.names:
            return self
        return replace(self, vocabulary=fit_vocabulary(_flat_nested(_array(table.column("top_token_ids"))).values))

    def metadata(self) -> dict[bytes, bytes]:
        params: dict[str, Any] = {"encoding": self.name}
        if self.format == "compact":
            params.update(step=self.step, reference="float16", max_depth_nats=MAX_DEPTH_NATS)
        elif self.format == "compact2":
            params.update(step=self.step, layout=self.layout, reference_step=REF_STEP, max_nats=MAX_NATS)
            if self.vocabulary is not None and len(self.vocabulary):
                params.update(vocabulary=_pack_ids(self.vocabulary), vocabulary_size=len(self.vocabulary),
                              vocabulary_crc32=_crc(self.vocabulary))
        metadata = {SOFT_LABELS_KEY: json.dumps(params).encode()}
        if self.format in FORMAT_SCHEMA_VERSIONS:
            metadata[SCHEMA_VERSION_KEY] = FORMAT_SCHEMA_VERSIONS[self.format].encode()
        return metadata


def fit_vocabulary(ids: np.ndarray) -> np.ndarray:
    """The ids seen at least VOCABULARY_MIN_COUNT times, most frequent first (ties by id): coded
    as their rank, frequent ids become small numbers whose bytes compress well. Past the first
    VOCABULARY_BAND ranks, each band of that many is sorted by id: a code's high bytes still
    name its band, and the table itself then delta-codes to about half the bytes."""
    if not len(ids):
        return np.zeros(0, np.int32)
    unique, counts = np.unique(ids, return_counts=True)
    kept = counts >= VOCABULARY_MIN_COUNT
    vocabulary = unique[kept][np.argsort(-counts[kept], kind="stable")].astype(np.int32)
    bands = [vocabulary[:VOCABULARY_BAND]] + [np.sort(vocabulary[i:i + VOCABULARY_BAND])
                                              for i in range(VOCABULARY_BAND, len(vocabulary), VOCABULARY_BAND)]
    fitted: np.ndarray = np.concatenate(bands)
    return fitted


def _pack_ids(ids: np.ndarray) -> str:
    """A vocabulary as metadata text: the first band as is, each later one as deltas from its
    previous id (its first: the id), little-endian int32 split into byte planes, zstd, base64."""
    index = np.arange(len(ids))
    deltas = ids.astype(np.int64)
    later = np.flatnonzero((index >= VOCABULARY_BAND) & (index % VOCABULARY_BAND != 0))
    deltas[later] = ids[later].astype(np.int64) - ids[later - 1]
    planes = np.ascontiguousarray(deltas.astype("<i4").view(np.uint8).reshape(-1, 4).T).tobytes()
    return base64.b64encode(pa.Codec("zstd", compression_level=19).compress(planes).to_pybytes()).decode()


def _unpack_ids(text: str, size: int) -> np.ndarray:
    raw = base64.b64decode(text.encode(), validate=True)
    data = pa.Codec("zstd").decompress(raw, decompressed_size=4 * int(size)).to_pybytes()
    if len(data) != 4 * int(size):
        raise ValueError("vocabulary of the wrong size")
    deltas = np.ascontiguousarray(np.frombuffer(data, np.uint8).reshape(4, -1).T).view("<i4").ravel().astype(np.int64)
    head, tail = deltas[:VOCABULARY_BAND], deltas[VOCABULARY_BAND:]
    running = np.cumsum(tail)
    starts = np.arange(0, len(tail), VOCABULARY_BAND)
    before = running[starts] - tail[starts]  # the running sum up to each band's first id
    ids: np.ndarray = np.concatenate([head, running - before[np.arange(len(tail)) // VOCABULARY_BAND]]).astype(np.int32)
    return ids


def _crc(ids: np.ndarray) -> int:
    """The vocabulary's CRC-32 (the footer that holds it has no checksum of its own)."""
    return zlib.crc32(ids.astype("<i4").tobytes())


def encoding_of(metadata: dict[bytes, bytes] | None, where: str | None = None) -> Encoding:
    """The encoding a shard's metadata names (float32 when it names none: schema version 1)."""
    raw = (metadata or {}).get(SOFT_LABELS_KEY)
    if raw is None:
        return Encoding()
    try:
        params = json.loads(raw)
        name = params["encoding"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardFormatError(f"unreadable teachercache.soft_labels metadata {raw[:200]!r}", where) from exc
    if name not in ENCODINGS:
        raise ShardFormatError(f"soft-label encoding {name!r} is not one this reader knows "
                               f"({', '.join(ENCODINGS)}): upgrade the teachercache client", where)
    if name != "compact":
        return Encoding(name)
    step, layout = params.get("step"), params.get("layout", 1)
    if step != STEP:
        raise ShardFormatError(f"compact soft labels with step {step!r}; this reader decodes step {STEP}", where)
    if layout not in COMPACT_LAYOUTS:
        raise ShardFormatError(f"compact soft labels of layout {layout!r}; this reader knows layouts "
                               f"{', '.join(map(str, COMPACT_LAYOUTS))}: upgrade the teachercache client", where)
    vocabulary = None
    if "vocabulary" in params:
        try:
            vocabulary = _unpack_ids(params["vocabulary"], params["vocabulary_size"])
        except (ValueError, TypeError, KeyError, OSError, pa.ArrowException) as exc:
            raise ShardFormatError("damaged compact vocabulary in the shard metadata", where) from exc
        if _crc(vocabulary) != params.get("vocabulary_crc32"):
            raise ShardFormatError("damaged compact vocabulary in the shard metadata (its CRC-32 differs)", where)
    return Encoding(name, step, layout, vocabulary)


def stored_schema(schema: pa.Schema, encoding: Encoding) -> pa.Schema:
    """`schema` (with the float32 soft-label columns) as `encoding` stores it."""
    fields: list[pa.Field] = []
    for column in schema:
        if column.name == "top_token_ids":
            fields += [pa.field(n, STORED_TYPES[encoding.format][n]) for n in STORED_COLUMNS[encoding.format]]
        elif _codes_sampled(encoding) and column.name in sampled_codes.SAMPLED_COLUMNS:
            if column.name == sampled_codes.SAMPLED_COLUMNS[0]:
                fields += [pa.field(n, t) for n, t in sampled_codes.CODED_TYPES.items()]
        elif column.name not in SOFT_LABEL_COLUMNS:
            fields.append(column)
    return pa.schema(fields, metadata={**(schema.metadata or {}), **encoding.metadata()})


def stored_columns(columns: list[str] | None, encoding: Encoding) -> list[str] | None:
    """The stored columns a projection onto (decoded) `columns` needs to read."""
    if columns is None or encoding.name == "float32":
        return columns
    wanted = [c for c in columns if c not in SOFT_LABEL_COLUMNS]
    sampled = _codes_sampled(encoding) and any(c in sampled_codes.SAMPLED_COLUMNS for c in columns)
    if sampled:  # the codes decode against the top-k ids; a file from before the codes has the plain columns
        wanted += list(sampled_codes.CODED_COLUMNS)  # (Parquet readers skip the names a file lacks)
    if sampled or any(c in SOFT_LABEL_COLUMNS for c in columns):
        wanted += list(STORED_COLUMNS[encoding.format])
    return wanted


def _codes_sampled(encoding: Encoding) -> bool:
    """Whether `encoding` stores sampled labels as top-k-referenced codes (teachercache/sampled_codes.py)."""
    return encoding.name == "compact"


# -- encoding (the service's assembly calls this; readers never do) ----------------------------


def encode(table: pa.Table | pa.RecordBatch, encoding: Encoding, schema: pa.Schema) -> pa.Table:
    """`table`'s rows with their float32 soft labels in `encoding`, as `schema` (a stored_schema)."""
    if encoding.name == "float32":
        return table.select(schema.names).cast(schema)
    columns = {name: table.column(name) for name in table.column_names}
    token = _flat_lists(_array(columns["token_logprobs"]))
    top_lps = _flat_nested(_array(columns["top_logprobs"]))
    if encoding.name == "float16":
        stored = {"token_logprobs": _lists(token.offsets, token.values.astype(np.float16)),
                  "top_token_ids": columns["top_token_ids"],
                  "top_logprobs": _nested(top_lps.row_offsets, top_lps.offsets, top_lps.values.astype(np.float16))}
    elif encoding.format == "compact2":
        stored = _encode_compact2(token, _flat_nested(_array(columns["top_token_ids"])), top_lps, encoding.vocabulary)
    else:
        stored = _encode_compact(token, _flat_nested(_array(columns["top_token_ids"])), top_lps)
    if _codes_sampled(encoding) and sampled_codes.CODED_COLUMNS[0] in schema.names:
        stored.update(sampled_codes.encode_sampled(*(_array(columns[n]) for n in ("top_token_ids",
                                                                                  *sampled_codes.SAMPLED_COLUMNS))))
    out = [stored[name] if name in stored else columns[name] for name in schema.names]
    return pa.Table.from_arrays([_array(c) for c in out], schema=schema)


def _check_shapes(token: _Flat, ids: _Nested, lps: _Nested) -> None:
    if not (np.array_equal(ids.row_offsets, lps.row_offsets) and np.array_equal(ids.offsets, lps.offsets)):
        raise ValueError("top_token_ids and top_logprobs differ in shape")
    if not np.array_equal(token.offsets, ids.row_offsets):
        raise ValueError("token_logprobs and top_token_ids differ in positions per row")
    if np.isnan(lps.values).any() or np.isnan(token.values).any() or (lps.values == np.inf).any():
        raise ValueError("soft labels hold NaN or +inf logprobs")


def _encode_compact2(token: _Flat, ids: _Nested, lps: _Nested, vocabulary: np.ndarray | None) -> dict[str, pa.Array]:
    """Layout 2. Ids: an id of the shard's vocabulary is coded as its rank there, any other as
    len(vocabulary) + id (int32). Logprobs: per position a reference `ref` (its best finite top-k
    logprob, or the token's own when there is none) as a whole number of REF_STEP nats; every
    logprob a whole number q of STEP nats below the decoded ref (rounded: within STEP / 2),
    coded in rank order as q minus the previous finite entry's q of its position (the first: q
    itself), and the token's own logprob as its q; int32 stored as uint32, NEG_INF_STEP for
    -inf. Logprobs below -MAX_NATS count as -inf (their probability is 0 in float64)."""
    _check_shapes(token, ids, lps)
    k = np.diff(ids.offsets)
    values = _clipped(lps.values.astype(np.float64))
    own = _clipped(token.values.astype(np.float64))
    best = _position_max(values, ids.offsets)
    ref_source = np.where(np.isfinite(best), best, own)
    ref_code = np.rint(np.where(np.isfinite(ref_source), ref_source, 0.0) / -REF_STEP).astype(np.int64)
    ref = ref_code * -REF_STEP
    q, ok = _steps_below(np.repeat(ref, k), values)
    steps = _int32_codes(_rank_deltas(q, ok, ids.offsets[:-1], k), ok)
    token_q, token_ok = _steps_below(ref, own)
    token_codes = _int32_codes(token_q, token_ok)
    ref_codes = ref_code.astype(np.int32).view(np.uint32)
    codes = _id_codes(ids.values.astype(np.int64), vocabulary)
    checksum = _checksum2((codes.view(np.uint32), steps), (ref_codes, token_codes), ids.row_offsets, ids.offsets)
    return {
        "top_token_codes": _nested(ids.row_offsets, ids.offsets, codes),
        "top_logprob_ref_codes": _lists(ids.row_offsets, ref_codes),
        "top_logprob_codes": _nested(ids.row_offsets, ids.offsets, steps),
        "token_logprob_codes": _lists(ids.row_offsets, token_codes),
        "soft_label_checksum": pa.array(checksum, pa.uint32()),
    }


def _clipped(values: np.ndarray) -> np.ndarray:
    """Logprobs with those below -MAX_NATS as -inf (layout 2 keeps every value a multiple of
    REF_STEP that float32 holds exactly)."""
    if (values > MAX_NATS).any():
        raise ValueError(f"soft labels hold logprobs above {MAX_NATS}")
    clipped: np.ndarray = np.where(values < -MAX_NATS, -np.inf, values)
    return clipped


def _int32_codes(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
    codes = np.where(ok, values, 0).astype(np.int32).view(np.uint32)
    codes[~ok] = NEG_INF_STEP
    return codes


def _id_codes(ids: np.ndarray, vocabulary: np.ndarray | None) -> np.ndarray:
    """Ids as layout 2 codes: their rank in `vocabulary`, else len(vocabulary) + id."""
    size = 0 if vocabulary is None else len(vocabulary)
    if len(ids) and (ids.min() < 0 or ids.max() >= 2**31 - 1 - size):
        raise ValueError("a top-k token id out of range")
    if not size or not len(ids):
        return ids.astype(np.int32)
    assert vocabulary is not None
    rank = np.full(max(int(ids.max()), int(vocabulary.max())) + 1, -1, np.int64)
    rank[vocabulary] = np.arange(size)
    found = rank[ids]
    codes: np.ndarray = np.where(found >= 0, found, ids + size).astype(np.int32)
    return codes


def _encode_compact(token: _Flat, ids: _Nested, lps: _Nested) -> dict[str, pa.Array]:
    """Layout 1 (read, and written only where a test asks for it by Encoding(..., layout=1))."""
    _check_shapes(token, ids, lps)
    positions = len(ids.offsets) - 1
    k = np.diff(ids.offsets)
    entry_position = np.repeat(np.arange(positions), k)
    values = lps.values.astype(np.float64)
    # The reference: the best finite top-k logprob, or the token's own when there is none.
    best = _position_max(values, ids.offsets)
    ref_source = np.where(np.isfinite(best), best, token.values.astype(np.float64))
    ref16 = np.where(np.isfinite(ref_source), ref_source, 0.0).astype(np.float16)
    ref = ref16.astype(np.float64)
    q, ok = _steps_below(ref[entry_position], values)
    starts = ids.offsets[:-1]
    dq = _rank_deltas(q, ok, starts, k)
    steps = np.where(ok, _zigzag(dq), NEG_INF_CODE).astype(np.uint32)
    token_q, token_ok = _steps_below(ref, token.values.astype(np.float64))
    token_steps = np.where(token_ok, _zigzag(token_q), NEG_INF_CODE).astype(np.uint32)
    checksum = _checksum(ids.values, steps, ref16, token_steps, ids.row_offsets, ids.offsets)
    return {
        "top_token_ids": _nested(ids.row_offsets, ids.offsets, ids.values.astype(np.int32)),
        "top_logprob_ref": _lists(ids.row_offsets, ref16),
        "top_logprob_steps": _nested(ids.row_offsets, ids.offsets, steps),
        "token_logprob_steps": _lists(ids.row_offsets, token_steps),
        "soft_label_checksum": pa.array(checksum, pa.uint32()),
    }


def _position_max(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each position's largest finite value (-inf for none, or an empty position)."""
    k = np.diff(offsets)
    finite_values = np.where(np.isfinite(values), values, -np.inf)
    width = _uniform_width(k)
    if width:
        uniform: np.ndarray = finite_values.reshape(-1, width).max(axis=1)
        return uniform
    best = np.full(len(k), -np.inf)
    nonempty = k > 0
    if nonempty.any():
        best[nonempty] = np.maximum.reduceat(finite_values, offsets[:-1][nonempty])
    return best


def _steps_below(ref: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole steps of `values` below `ref` (int64), and where they are finite and in range."""
    depth = ref - values
    ok = np.isfinite(depth) & (depth <= MAX_DEPTH_NATS) & (depth >= -MAX_DEPTH_NATS)
    return np.where(ok, np.rint(np.where(ok, depth, 0.0) / STEP), 0).astype(np.int64), ok


def _rank_deltas(q: np.ndarray, ok: np.ndarray, starts: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Each entry's steps minus the previous finite entry's of its position (the first's own)."""
    index = np.arange(len(q))
    is_start = np.zeros(len(q), bool)
    is_start[starts[k > 0]] = True
    # Forward-fill over -inf entries, never across a position's start.
    last = np.maximum.accumulate(np.where(ok | is_start, index, 0)) if len(q) else index
    filled = np.where(ok[last], q[last], 0)
    previous = np.empty_like(filled)
    if len(q):
        previous[1:] = filled[:-1]
        previous[0] = 0
    previous[is_start] = 0
    steps: np.ndarray = filled - previous
    return steps


# -- decoding (every reader) -------------------------------------------------------------------


def decode_table(table: pa.Table, where: str | None = None) -> pa.Table:
    """The table with float32 soft-label columns, whatever encoding its metadata names."""
    return decode(table, encoding_of(table.schema.metadata, where), where)


def decode(data: pa.Table | pa.RecordBatch, encoding: Encoding, where: str | None = None,
           columns: list[str] | None = None) -> pa.Table | pa.RecordBatch:
    """`data` as read from a shard of `encoding`, with the float32 columns in place of the stored
    ones; `columns`, if given, is the projection the caller asked for (decoded names)."""
    data = _decode_top_k(data, encoding, where)
    # Sampled codes refer to the positions' top-k ids, decoded first (layout 2 codes those too).
    if _codes_sampled(encoding) and sampled_codes.CODED_COLUMNS[0] in data.schema.names:
        data = _decode_sampled(data, encoding, where)
    if columns is None:
        return data
    names = data.schema.names
    order = sorted((i for i, n in enumerate(names) if n in columns), key=lambda i: columns.index(names[i]))
    return data.select([names[i] for i in order])


def _decode_top_k(data: pa.Table | pa.RecordBatch, encoding: Encoding,
                  where: str | None) -> pa.Table | pa.RecordBatch:
    """`data` with its stored top-k columns decoded into the float32 ones, in place."""
    names = data.schema.names
    if encoding.name == "float32" or not any(n in names for n in STORED_COLUMNS[encoding.format]):
        return data
    _check_stored_types(data.schema, encoding, where)
    try:
        if encoding.name == "float16":
            decoded = _decode_float16(data)
        elif encoding.format == "compact2":
            decoded = _decode_compact2(data, encoding.vocabulary, where)
        else:
            decoded = _decode_compact(data, where)
    except ShardFormatError:
        raise
    except (ValueError, IndexError, pa.ArrowException) as exc:
        raise ShardFormatError(f"damaged {encoding.name} soft labels: {exc}", where) from exc
    stored = STORED_COLUMNS[encoding.format]
    out_names, out_arrays = [], []
    for name in names:
        if name not in stored:
            out_names.append(name)
            out_arrays.append(data.column(name))
        elif not any(n in out_names for n in SOFT_LABEL_COLUMNS):  # the first stored one: all three here
            out_names += list(SOFT_LABEL_COLUMNS)
            out_arrays += [decoded[n] for n in SOFT_LABEL_COLUMNS]
    schema = pa.schema([pa.field(n, a.type) for n, a in zip(out_names, out_arrays)], metadata=data.schema.metadata)
    if isinstance(data, pa.RecordBatch):
        return pa.RecordBatch.from_arrays([_array(a) for a in out_arrays], schema=schema)
    return pa.Table.from_arrays(out_arrays, schema=schema)


def _decode_sampled(data: pa.Table | pa.RecordBatch, encoding: Encoding,
                    where: str | None) -> pa.Table | pa.RecordBatch:
    """`data` (its top-k decoded) with the coded sampled columns decoded into sample_token_ids /
    sample_counts, in place."""
    for name, expected in sampled_codes.CODED_TYPES.items():
        if name not in data.schema.names or data.schema.field(name).type != expected:
            raise ShardFormatError(f"compact sampled labels without a {expected} column {name}", where)
    if "top_token_ids" in data.schema.names and data.schema.field("top_token_ids").type != pa.list_(pa.list_(pa.int32())):
        raise ShardFormatError(f"top_token_ids of {encoding.name} sampled labels is not list<list<int32>>", where)
    if "top_token_ids" not in data.schema.names:
        raise ShardFormatError("compact sampled labels read without top_token_ids", where)
    try:
        decoded = sampled_codes.decode_sampled(*(_array(data.column(n)) for n in ("top_token_ids",
                                                                                 *sampled_codes.CODED_COLUMNS)))
    except (ValueError, IndexError, pa.ArrowException) as exc:
        raise ShardFormatError(f"damaged compact sampled labels: {exc}", where) from exc
    names, arrays = [], []
    for name in data.schema.names:
        if name == sampled_codes.CODED_COLUMNS[0]:
            names += list(sampled_codes.SAMPLED_COLUMNS)
            arrays += [decoded[n] for n in sampled_codes.SAMPLED_COLUMNS]
        elif name != sampled_codes.CODED_COLUMNS[1]:
            names.append(name)
            arrays.append(_array(data.column(name)))
    schema = pa.schema([pa.field(n, a.type) for n, a in zip(names, arrays, strict=True)], metadata=data.schema.metadata)
    if isinstance(data, pa.RecordBatch):
        return pa.RecordBatch.from_arrays(arrays, schema=schema)
    return pa.Table.from_arrays(arrays, schema=schema)


def _check_stored_types(schema: pa.Schema, encoding: Encoding, where: str | None) -> None:
    """A damaged file can read back with a stored column of another type (a flipped bit in its
    Thrift footer turns a list into a struct): refuse it as damage, never decode it as numbers."""
    for name, expected in STORED_TYPES[encoding.format].items():
        if name in schema.names and schema.field(name).type != expected:
            raise ShardFormatError(f"{encoding.name} soft-label column {name} is {schema.field(name).type}, "
                                   f"not {expected} (a damaged or foreign file)", where)


def _decode_float16(data: pa.Table | pa.RecordBatch) -> dict[str, pa.Array]:
    return {"token_logprobs": _array(data.column("token_logprobs")).cast(FLOAT32_TYPES["token_logprobs"]),
            "top_token_ids": _array(data.column("top_token_ids")),
            "top_logprobs": _array(data.column("top_logprobs")).cast(FLOAT32_TYPES["top_logprobs"])}


def _decode_compact(data: pa.Table | pa.RecordBatch, where: str | None) -> dict[str, pa.Array]:
    missing = [n for n in COMPACT_COLUMNS if n not in data.schema.names]
    if missing:
        raise ShardFormatError(f"compact soft labels without {', '.join(missing)}", where)
    ids = _flat_nested(_array(data.column("top_token_ids")))
    steps = _flat_nested(_array(data.column("top_logprob_steps")))
    if steps.values.dtype != np.uint32 or ids.values.dtype != np.int32:
        raise ShardFormatError("compact soft-label columns of the wrong types", where)
    ref = _flat_lists(_array(data.column("top_logprob_ref")))
    token = _flat_lists(_array(data.column("token_logprob_steps")))
    checksum = _checked_compact_shapes(data, where, ids, steps, ref, token)
    ref16 = ref.values.astype(np.float16, copy=False)
    expected = _checksum(ids.values, steps.values, ref16, token.values, ids.row_offsets, ids.offsets)
    bad = np.flatnonzero(expected != checksum.to_numpy(zero_copy_only=False))
    if len(bad):
        raise ShardFormatError(f"compact soft labels fail their checksum in {len(bad)} rows "
                               f"(first: row {int(bad[0])} of its batch)", where)
    ref32 = ref16.astype(np.float32)
    top = _decode_steps(steps.values, ids.offsets, ref32)
    token_finite = token.values != NEG_INF_CODE
    token_lp = np.where(token_finite, ref32 - _unzigzag(np.where(token_finite, token.values, 0)) * np.float32(STEP),
                        np.float32(-np.inf)).astype(np.float32)
    return {"token_logprobs": _lists(ids.row_offsets, token_lp),
            "top_token_ids": _nested(ids.row_offsets, ids.offsets, ids.values.astype(np.int32, copy=False)),
            "top_logprobs": _nested(ids.row_offsets, ids.offsets, top)}


def _checked_compact_shapes(data: pa.Table | pa.RecordBatch, where: str | None, ids: _Nested, steps: _Nested,
                            *per_position: _Flat) -> pa.Array:
    """Both compact layouts: the row checksums (none missing), and every column the shape of the
    ids (a truncated or damaged file disagrees); the checksum column."""
    checksum = _array(data.column("soft_label_checksum"))
    if checksum.null_count:
        raise ShardFormatError("compact soft labels with a missing checksum", where)
    same_shape = (np.array_equal(ids.row_offsets, steps.row_offsets) and np.array_equal(ids.offsets, steps.offsets)
                  and all(np.array_equal(flat.offsets, ids.row_offsets) for flat in per_position))
    if not same_shape:
        raise ShardFormatError("compact soft-label columns disagree in shape (truncated or damaged data)", where)
    return checksum


def _decode_compact2(data: pa.Table | pa.RecordBatch, vocabulary: np.ndarray | None,
                     where: str | None) -> dict[str, pa.Array]:
    missing = [n for n in COMPACT2_COLUMNS if n not in data.schema.names]
    if missing:
        raise ShardFormatError(f"compact soft labels without {', '.join(missing)}", where)
    codes = _flat_nested(_array(data.column("top_token_codes")))
    steps = _flat_nested(_array(data.column("top_logprob_codes")))
    ref_codes = _flat_lists(_array(data.column("top_logprob_ref_codes")))
    token = _flat_lists(_array(data.column("token_logprob_codes")))
    checksum = _checked_compact_shapes(data, where, codes, steps, ref_codes, token)
    expected = _checksum2((codes.values.view(np.uint32), steps.values), (ref_codes.values, token.values),
                          codes.row_offsets, codes.offsets)
    bad = np.flatnonzero(expected != checksum.to_numpy(zero_copy_only=False))
    if len(bad):
        raise ShardFormatError(f"compact soft labels fail their checksum in {len(bad)} rows "
                               f"(first: row {int(bad[0])} of its batch)", where)
    ids = _ids_of_codes(codes.values, vocabulary)
    if ids is None:
        raise ShardFormatError("compact soft labels with negative token codes", where)
    ref = ref_codes.values.view(np.int32).astype(np.float32) * np.float32(-REF_STEP)  # exact: |code| < 2^24
    top = _decode_below(steps.values, codes.offsets, ref)
    token_lp = ref - token.values.view(np.int32).astype(np.float32) * np.float32(STEP)
    token_lp[token.values == NEG_INF_STEP] = -np.inf
    return {"token_logprobs": _lists(codes.row_offsets, token_lp),
            "top_token_ids": _nested(codes.row_offsets, codes.offsets, ids),
            "top_logprobs": _nested(codes.row_offsets, codes.offsets, top)}


def _ids_of_codes(codes: np.ndarray, vocabulary: np.ndarray | None) -> np.ndarray | None:
    """Layout 2's ids from their codes (None if a code is negative: damage)."""
    if not len(codes):
        return codes
    largest = int(codes.view(np.uint32).max())  # a negative code reads as 2^31 or more
    if largest >= 2**31:
        return None
    size = 0 if vocabulary is None else len(vocabulary)
    if not size:
        return codes
    assert vocabulary is not None
    # One gather through the vocabulary extended by the escaped ids (code - size) in use.
    table = vocabulary if largest < size else np.concatenate([vocabulary, np.arange(largest - size + 1, dtype=np.int32)])
    ids: np.ndarray = np.take(table, codes)
    return ids


# OpenBLAS runs a product of at most 2^18 multiply-adds on the calling thread; a larger one spreads
# over threads that spin, costing more CPU time than the product saves on one core.
_SMALL_PRODUCT = 2**18


@functools.lru_cache(maxsize=64)
def _running_sum_matrix(width: int) -> np.ndarray:
    """(width, width) float32, -STEP on and above the diagonal: rows @ it = -STEP * running sums."""
    matrix: np.ndarray = np.triu(np.full((width, width), -STEP, np.float32))
    return matrix


def _decode_below(codes: np.ndarray, offsets: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Layout 2's logprobs (float32, rank order): each position's running sum of its int32 step
    deltas (-inf entries add nothing) below its reference. Exact in float32: multiples of
    REF_STEP below 2^16 nats in magnitude."""
    k = np.diff(offsets)
    dq = codes.view(np.int32)
    # -inf is int32's minimum: one reduction tells whether there is any (rare) to mask.
    any_inf = bool(len(dq)) and int(dq.min()) == np.iinfo(np.int32).min
    if any_inf:
        finite = codes != NEG_INF_STEP
        dq = np.where(finite, dq, 0)
    width = _uniform_width(k)
    if width:  # the usual case: every position has k entries
        rows = dq.reshape(-1, width)
        if len(rows) and width * max(int(rows.max()), -int(rows.min())) < 2**24:
            # The running sums as one float32 product with a triangular matrix of -STEP (BLAS:
            # several times faster than cumsum along short rows), exact: every partial sum,
            # in whatever order BLAS adds, is a multiple of STEP below 2^24 steps.
            below = np.empty(rows.shape, np.float32)
            matrix, block = _running_sum_matrix(width), max(64, _SMALL_PRODUCT // (width * width))
            for start in range(0, len(rows), block):  # products small enough that BLAS runs them
                np.matmul(rows[start:start + block], matrix, out=below[start:start + block])  # on this thread
        else:
            below = np.cumsum(rows, axis=1, dtype=np.int64).astype(np.float32) * np.float32(-STEP)
        below += ref[:, None]
        values = below.ravel()
    else:
        entry_position = np.repeat(np.arange(len(k)), k)
        total = np.cumsum(dq, dtype=np.int64)
        offset = np.zeros(len(k), np.int64)
        offset[k > 0] = (total - dq)[offsets[:-1][k > 0]]  # the running sum up to each position's start
        values = ref[entry_position] - (total - offset[entry_position]).astype(np.float32) * np.float32(STEP)
    if any_inf:
        values[~finite] = -np.inf
    decoded: np.ndarray = values.astype(np.float32, copy=False)
    return decoded


def _decode_steps(codes: np.ndarray, offsets: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Logprobs (float32, rank order) from their steps: each position's running sum of deltas
    below its reference. float32 arithmetic is exact here (a float16 reference minus a multiple
    of 1/16), so the result is the one correctly rounded value either way."""
    k = np.diff(offsets)
    finite = codes != NEG_INF_CODE
    any_inf = not finite.all()
    dq = _unzigzag(np.where(finite, codes, 0) if any_inf else codes)
    width = _uniform_width(k)
    if width:  # the usual case: every position has k entries, one cumsum along rows
        q = np.cumsum(dq.reshape(-1, width), axis=1, dtype=np.int32)
        values = ref[:, None] - q.astype(np.float32) * np.float32(STEP)
        return (np.where(finite.reshape(-1, width), values, np.float32(-np.inf)) if any_inf else values).ravel()
    entry_position = np.repeat(np.arange(len(k)), k)
    total = np.cumsum(dq, dtype=np.int64)
    offset = np.zeros(len(k), np.int64)
    offset[k > 0] = (total - dq)[offsets[:-1][k > 0]]  # the running sum up to each position's start
    q = total - offset[entry_position]
    return np.where(finite, ref[entry_position] - q.astype(np.float32) * np.float32(STEP),
                    np.float32(-np.inf)).astype(np.float32)


def _uniform_width(k: np.ndarray) -> int:
    """k when every position has the same k > 0 entries, else 0."""
    return int(k[0]) if len(k) and k[0] > 0 and (k == k[0]).all() else 0


def _checksum(ids: np.ndarray, steps: np.ndarray, ref16: np.ndarray, token_steps: np.ndarray,
              row_offsets: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per row, a weighted sum (mod 2^32) of every encoded value: any one changed value changes
    it (each weight is odd, so invertible mod 2^32), and so does a value moved within its row."""
    lo, hi = np.asarray(row_offsets[:-1], np.int64), np.asarray(row_offsets[1:], np.int64)
    with np.errstate(over="ignore"):
        checksum: np.ndarray = (_entry_sums(ids.view(np.uint32), row_offsets, offsets, 0x9E3779B1)
                                + _entry_sums(steps, row_offsets, offsets, 0x85EBCA77)
                                + _row_sums(ref16.view(np.uint16).astype(np.uint32), lo, hi, 0xC2B2AE3D)
                                + _row_sums(token_steps, lo, hi, 0x27D4EB2F))
    return checksum


def _checksum2(entries: tuple[np.ndarray, ...], positions: tuple[np.ndarray, ...], row_offsets: np.ndarray,
               offsets: np.ndarray) -> np.ndarray:
    """Layout 2's per-row checksum: _checksum's weighted sums over each array of entry values
    (positions x k) and of position values (uint32), each with its own salt."""
    lo, hi = np.asarray(row_offsets[:-1], np.int64), np.asarray(row_offsets[1:], np.int64)
    checksum = np.zeros(len(lo), np.uint32)
    with np.errstate(over="ignore"):
        for values, salt in zip(entries, (0x9E3779B1, 0x85EBCA77)):
            checksum += _entry_sums(values, row_offsets, offsets, salt)
        for values, salt in zip(positions, (0xC2B2AE3D, 0x27D4EB2F)):
            checksum += _row_sums(values, lo, hi, salt)
    return checksum


def _entry_sums(values: np.ndarray, row_offsets: np.ndarray, offsets: np.ndarray, salt: int) -> np.ndarray:
    """_row_sums over the entries of each row (positions x k), by rows of the (P, k) matrix
    when k is uniform: per position sum(v+1) and sum((v+1)(2j+salt)), then the rows' shifts."""
    width = _uniform_width(np.diff(offsets))
    if not width:
        return _row_sums(values, offsets[row_offsets[:-1]].astype(np.int64),
                         offsets[row_offsets[1:]].astype(np.int64), salt)
    with np.errstate(over="ignore"):
        weights = np.arange(width, dtype=np.uint32) * np.uint32(2) + np.uint32(salt | 1)
        # sum((v+1)w) = v.w + sum(w) and sum(v+1) = v.1 + k, both from one wrapping uint32 matrix
        # product (numpy's integer matmul: several times faster than multiply-then-sum by rows).
        both = values.reshape(-1, width) @ np.stack([weights, np.ones(width, np.uint32)], axis=1)
        weighted = both[:, 0] + weights.sum(dtype=np.uint32)
        plain = both[:, 1] + np.uint32(width)
        local = (np.arange(len(plain)) - np.repeat(row_offsets[:-1], np.diff(row_offsets))).astype(np.uint32)
        per_position = weighted + np.uint32(2 * width) * local * plain
        running = np.zeros(len(per_position) + 1, np.uint32)
        np.cumsum(per_position, dtype=np.uint32, out=running[1:])
        sums: np.ndarray = running[row_offsets[1:]] - running[row_offsets[:-1]]
    return sums


def _row_sums(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, salt: int) -> np.ndarray:
    """Per row [lo, hi): sum of (v + 1) * (2 * (i - lo) + salt) mod 2^32, from two global running
    sums (weights by global index, then each row's shift), so no per-entry row index is built."""
    with np.errstate(over="ignore"):
        shifted = values.astype(np.uint32, copy=False) + np.uint32(1)
        weighted = shifted * (np.arange(len(values), dtype=np.uint32) * np.uint32(2) + np.uint32(salt | 1))
        running = np.zeros(len(values) + 1, np.uint32)
        np.cumsum(weighted, dtype=np.uint32, out=running[1:])
        plain = np.zeros(len(values) + 1, np.uint32)
        np.cumsum(shifted, dtype=np.uint32, out=plain[1:])
        sums: np.ndarray = (running[hi] - running[lo]) - np.uint32(2) * lo.astype(np.uint32) * (plain[hi] - plain[lo])
    return sums


def _zigzag(v: np.ndarray) -> np.ndarray:
    if len(v) and (np.abs(v) >= 2**31 - 1).any():
        raise ValueError("a logprob step delta out of range")
    return ((v << 1) ^ (v >> 63)).astype(np.uint64)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    """int32 from zig-zag uint32 (steps stay within +-2^25, far inside int32)."""
    u = u.astype(np.uint32, copy=False)
    return (u >> np.uint32(1)).astype(np.int32) ^ -(u & np.uint32(1)).astype(np.int32)


# -- Arrow list plumbing ----------------------------------------------------------------------


@dataclass
class _Flat:
    offsets: np.ndarray  # int64, from 0
    values: np.ndarray


@dataclass
class _Nested:
    row_offsets: np.ndarray  # positions per row
    offsets: np.ndarray  # entries per position
    values: np.ndarray


def _array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _offsets(array: pa.ListArray) -> np.ndarray:
    if array.null_count:
        raise ValueError("null soft-label lists")
    offsets: np.ndarray = array.offsets.to_numpy().astype(np.int64)
    from_zero: np.ndarray = offsets - offsets[0]
    return from_zero


def _flat_lists(array: pa.ListArray) -> _Flat:
    return _Flat(_offsets(array), array.flatten().to_numpy(zero_copy_only=False))


def _flat_nested(array: pa.ListArray) -> _Nested:
    inner = array.flatten()
    return _Nested(_offsets(array), _offsets(inner), inner.flatten().to_numpy(zero_copy_only=False))


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _nested(row_offsets: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(row_offsets.astype(np.int32)), _lists(offsets, values))


def tail_logprob(top_logprobs: list[float]) -> float:
    """The ghost token: log(1 - sum of the top-k probabilities), from the teacher's float32
    top-k logprobs (the engine's values from its full float32 distribution, not a delivery
    encoding's rounded ones), summed in float64; -inf when the top-k holds all the mass."""
    mass = math.fsum(math.exp(v) for v in top_logprobs)
    return math.log1p(-mass) if mass < 1.0 else -math.inf


def tail_logprobs(top_logprobs: pa.ListArray | pa.ChunkedArray) -> pa.ListArray:
    """`tail_logprob` for a whole column of rows (list<list<float32>> -> list<float32>),
    vectorised: the float64 sum of each position's top-k probabilities."""
    rows = _array(top_logprobs)
    row_offsets = _offsets(rows)
    positions = rows.flatten()
    offsets = _offsets(positions)
    values = positions.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    running = np.concatenate(([0.0], np.cumsum(np.exp(values))))
    sums = running[offsets[1:]] - running[offsets[:-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        tails = np.where(sums < 1.0, np.log1p(-np.minimum(sums, 1.0)), -np.inf).astype(np.float32)
    return _lists(row_offsets, tails)
