"""Soft-label encodings, property-tested: random top-k rows (ties, -inf, k from 0 to 64, vocabularies
of 1,000 to 256,000 ids) written to Parquet the way assembly writes a job shard and read back the
way every client reader does. float32 is bit-exact, float16 within half precision, compact within
its documented bounds with the top-k order intact; damaged or truncated encoded data is refused,
never decoded into other numbers."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import teachercache as tc
from teachercache.shard_format import JOB_SCHEMA, open_shard, parquet_options, shard_metadata
from teachercache.soft_labels import (
    COMPACT_LAYOUT,
    NEG_INF_CODE,
    SOFT_LABELS_KEY,
    STEP,
    Encoding,
    decode,
    decode_table,
    encode,
    stored_schema,
)

FLOAT16_RELATIVE = 2.0**-11  # half precision's rounding, relative
FLOAT16_ABSOLUTE = 2.0**-25  # below float16's normal range


@st.composite
def position(draw, vocab: int, k: int):
    """One completion position: k distinct ids, logprobs best first (ties and -inf allowed)."""
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=k, max_size=k, unique=True))
    finite = st.floats(-1e4, 0.0, width=32, allow_nan=False)
    values = draw(st.lists(st.one_of(finite, finite, finite, st.just(float("-inf"))), min_size=k, max_size=k))
    if draw(st.booleans()) and k > 1:  # a tie
        values[1] = values[0]
    values.sort(reverse=True)
    token = draw(st.one_of(st.sampled_from(values), finite) if values else finite)
    return ids, values, token


@st.composite
def rows(draw):
    vocab = draw(st.sampled_from([1000, 32_000, 49_152, 151_936, 256_000]))
    k = draw(st.integers(0, 64))  # 0: a job without top-k still has each token's own logprob
    out = []
    for index in range(draw(st.integers(1, 4))):
        positions = [draw(position(vocab, k)) for _ in range(draw(st.integers(0, 6)))]
        out.append({
            "custom_id": f"q{index}", "request_index": index, "sample_index": 0, "prompt_token_ids": [1, 2],
            "completion_token_ids": [p[0][0] if p[0] else 7 for p in positions], "completion_text": "",
            "token_logprobs": [p[2] for p in positions], "top_token_ids": [p[0] for p in positions],
            "top_logprobs": [p[1] for p in positions], "finish_reason": "length", "error": None, "cached": False,
        })
    return pa.Table.from_pylist(out, schema=JOB_SCHEMA)


def written(table: pa.Table, name: str | Encoding) -> bytes:
    """A job shard of `table` in encoding `name`, as assembly writes one: compact's vocabulary
    fitted on the first window (the first half of the rows), the second window coded with it
    (its ids outside the vocabulary escaped)."""
    encoding = Encoding.named(name) if isinstance(name, str) else name
    first, second = table.slice(0, (table.num_rows + 1) // 2), table.slice((table.num_rows + 1) // 2)
    encoding = encoding.fitted(first)
    schema = stored_schema(JOB_SCHEMA.with_metadata(shard_metadata({})), encoding)
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, schema, **parquet_options(schema)) as writer:
        for piece in (first, second):
            writer.write_table(encode(piece, encoding, schema))
    return buffer.getvalue()


def read_back(data: bytes) -> pa.Table:
    """What every client reader does: check the format, then decode each batch."""
    from teachercache.soft_labels import encoding_of

    parquet, _ = open_shard(io.BytesIO(data), "shard")
    encoding = encoding_of(parquet.schema_arrow.metadata)
    return pa.Table.from_batches([decode(b, encoding) for b in parquet.iter_batches()])


def flat(table: pa.Table, column: str) -> np.ndarray:
    array = table.column(column).combine_chunks()
    while pa.types.is_list(array.type):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False)


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(rows())
def test_float32_and_the_lossless_layout_round_trip_bit_for_bit(table):
    back = read_back(written(table, "float32"))
    assert back.schema.remove_metadata().equals(JOB_SCHEMA)
    for column in ("token_logprobs", "top_logprobs"):
        assert flat(back, column).view(np.uint32).tolist() == flat(table, column).view(np.uint32).tolist()
    assert back.column("top_token_ids").equals(table.column("top_token_ids"))


@PROPERTY
@given(rows())
def test_float16_is_within_half_precision(table):
    back = read_back(written(table, "float16"))
    assert back.schema.remove_metadata().equals(JOB_SCHEMA)
    assert back.column("top_token_ids").equals(table.column("top_token_ids"))
    for column in ("token_logprobs", "top_logprobs"):
        exact, got = flat(table, column).astype(np.float64), flat(back, column).astype(np.float64)
        assert np.array_equal(np.isneginf(exact), np.isneginf(got))
        finite = np.isfinite(exact)
        bound = np.maximum(np.abs(exact[finite]) * FLOAT16_RELATIVE, FLOAT16_ABSOLUTE)
        assert (np.abs(got[finite] - exact[finite]) <= bound).all()


@PROPERTY
@given(rows(), st.sampled_from([COMPACT_LAYOUT, 1]))
def test_compact_keeps_ids_and_order_exactly_and_logprobs_within_a_thirty_second_of_a_nat(table, layout):
    """Layout 2 (written now) and layout 1 (shards written before it, still read)."""
    back = read_back(written(table, Encoding("compact", STEP, layout)))
    assert back.schema.remove_metadata().equals(JOB_SCHEMA)
    assert back.column("top_token_ids").equals(table.column("top_token_ids"))  # ids and their order
    for column in ("token_logprobs", "top_logprobs"):
        exact, got = flat(table, column).astype(np.float64), flat(back, column).astype(np.float64)
        assert np.array_equal(np.isneginf(exact), np.isneginf(got))
        finite = np.isfinite(exact)
        # Layout 2: every value within half a step. Layout 1: the reference (each position's
        # best) is float16, everything else a step below it.
        bound = STEP / 2 if layout == COMPACT_LAYOUT else \
            STEP / 2 + np.maximum(np.abs(exact[finite]) * FLOAT16_RELATIVE, FLOAT16_ABSOLUTE)
        assert (np.abs(got[finite] - exact[finite]) <= bound).all()
    # Quantising never reorders: decoded logprobs stay best first.
    for position in back.column("top_logprobs").to_pylist():
        for values in position:
            assert values == sorted(values, reverse=True)


def compact_table(table: pa.Table) -> tuple[pa.Table, Encoding]:
    encoding = Encoding.named("compact").fitted(table)
    return encode(table, encoding, stored_schema(JOB_SCHEMA, encoding)), encoding


def replace_values(table: pa.Table, column: str, change) -> pa.Table:
    """`table` with the leaf values of a list column passed through `change` (same shape)."""
    array = table.column(column).combine_chunks()
    levels = []
    while pa.types.is_list(array.type):
        levels.append(array.offsets)
        array = array.flatten()
    values = pa.array(change(array.to_numpy(zero_copy_only=False).copy()), array.type)
    for offsets in reversed(levels):
        values = pa.ListArray.from_arrays(offsets, values)
    return table.set_column(table.schema.get_field_index(column), column, values)


@PROPERTY
@given(rows(), st.sampled_from(["top_token_codes", "top_logprob_codes", "top_logprob_ref_codes", "token_logprob_codes"]),
       st.data())
def test_a_changed_encoded_value_is_detected_never_decoded(table, column, data):
    encoded, encoding = compact_table(table)
    size = len(flat(encoded, column))
    if size == 0:
        return
    index = data.draw(st.integers(0, size - 1))

    def corrupt(values):
        if values.dtype == np.float16:
            values.view(np.uint16)[index] ^= np.uint16(1 << data.draw(st.integers(0, 15)))
        else:
            values[index] = values[index] ^ values.dtype.type(1 << data.draw(st.integers(0, 30)))
        return values

    with pytest.raises(tc.ShardFormatError, match="checksum"):
        decode(replace_values(encoded, column, corrupt), encoding)


@PROPERTY
@given(rows())
def test_truncated_encoded_data_is_detected(table):
    encoded, encoding = compact_table(table)
    steps = encoded.column("top_logprob_codes").combine_chunks()
    if len(steps.flatten().flatten()) == 0:
        return
    # The last position's steps lose their last entry: the columns no longer agree in shape.
    inner = steps.flatten()
    offsets = inner.offsets.to_numpy().copy()
    offsets[-1] -= 1
    shorter = pa.ListArray.from_arrays(pa.array(offsets), inner.flatten().slice(0, offsets[-1]))
    truncated = encoded.set_column(encoded.schema.get_field_index("top_logprob_codes"), "top_logprob_codes",
                                   pa.ListArray.from_arrays(steps.offsets, shorter))
    with pytest.raises(tc.ShardFormatError):
        decode(truncated, encoding)


@PROPERTY
@given(rows(), st.data())
def test_a_flipped_byte_in_the_file_is_refused_or_harmless(table, data):
    """Page checksums and the rows' own: a damaged file never reads as other numbers."""
    good = written(table, "compact")
    spot = data.draw(st.integers(4, len(good) - 9))  # inside the file, past the magic
    bad = bytearray(good)
    bad[spot] ^= 1 << data.draw(st.integers(0, 7))
    expected = read_back(good)
    try:
        got = read_back(bytes(bad))
    except (tc.ShardFormatError, OSError, pa.ArrowException, ValueError, UnicodeDecodeError):
        return
    soft = ["token_logprobs", "top_token_ids", "top_logprobs"]
    assert got.select(soft).equals(expected.select(soft))


@pytest.mark.parametrize("column", ["top_logprob_codes", "top_token_codes", "top_logprob_ref_codes", "soft_label_checksum"])
def test_a_stored_column_of_another_type_is_refused_as_damage(column):
    """A flipped bit in the footer can turn a list column into a struct (hypothesis found one):
    the decoder refuses it with its own error instead of failing inside numpy."""
    rows = [{"custom_id": "q0", "request_index": 0, "sample_index": 0, "prompt_token_ids": [1],
             "completion_token_ids": [5, 6], "completion_text": "ab", "token_logprobs": [-0.5, -1.25],
             "top_token_ids": [[5, 9], [6, 2]], "top_logprobs": [[-0.5, -2.0], [-1.25, -1.5]],
             "finish_reason": "length", "error": None, "cached": False}]
    stored = pq.read_table(io.BytesIO(written(pa.Table.from_pylist(rows, schema=JOB_SCHEMA), "compact")))
    index = stored.schema.get_field_index(column)
    struct = pa.StructArray.from_arrays([pa.array([0] * stored.num_rows, pa.int64())], ["x"])
    damaged = stored.set_column(index, pa.field(column, struct.type), pa.chunked_array([struct]))
    buffer = io.BytesIO()
    pq.write_table(damaged, buffer)
    with pytest.raises(tc.ShardFormatError, match=f"column {column} is struct"):
        read_back(buffer.getvalue())


def test_an_unknown_encoding_is_refused_with_a_clear_error():
    table = pq.read_table(io.BytesIO(written(pa.Table.from_pylist([], schema=JOB_SCHEMA), "compact")))
    metadata = {**table.schema.metadata, SOFT_LABELS_KEY: b'{"encoding": "bitpack"}'}
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata), buffer)
    data = buffer.getvalue()
    with pytest.raises(tc.ShardFormatError, match="'bitpack' is not one this reader knows"):
        read_back(data)


def test_decode_table_serves_readers_of_plain_parquet():
    """The documented path for HF datasets / Polars users: pq.read_table, then decode_table."""
    rows = [{"custom_id": "q0", "request_index": 0, "sample_index": 0, "prompt_token_ids": [1],
             "completion_token_ids": [5, 6], "completion_text": "ab", "token_logprobs": [-0.5, -1.25],
             "top_token_ids": [[5, 9], [6, 2]], "top_logprobs": [[-0.5, -2.0], [-1.25, -1.5]],
             "finish_reason": "length", "error": None, "cached": False}]
    table = pa.Table.from_pylist(rows, schema=JOB_SCHEMA)
    plain = pq.read_table(io.BytesIO(written(table, "compact")))
    assert "top_logprobs" not in plain.column_names and SOFT_LABELS_KEY in plain.schema.metadata
    decoded = decode_table(plain)
    assert decoded.column_names == JOB_SCHEMA.names
    assert decoded.to_pylist()[0]["top_logprobs"] == rows[0]["top_logprobs"]  # multiples of 1/16: exact
    assert int(NEG_INF_CODE) == 0xFFFFFFFF


def test_a_damaged_vocabulary_in_the_footer_is_refused():
    """The vocabulary lives in the footer, which has no page checksum: its own CRC-32 guards it."""
    rows = [{"custom_id": "q0", "request_index": 0, "sample_index": 0, "prompt_token_ids": [1],
             "completion_token_ids": [5, 6, 5], "completion_text": "ab", "token_logprobs": [-0.5, -1.25, -0.5],
             "top_token_ids": [[5, 9], [6, 5], [5, 9]], "top_logprobs": [[-0.5, -2.0], [-1.25, -1.5], [-0.5, -2.0]],
             "finish_reason": "length", "error": None, "cached": False}]
    table = pq.read_table(io.BytesIO(written(pa.Table.from_pylist(rows, schema=JOB_SCHEMA), "compact")))
    params = json.loads(table.schema.metadata[SOFT_LABELS_KEY])
    assert params["layout"] == COMPACT_LAYOUT and params["vocabulary_size"] == 2  # 5 and 9 repeat
    for damaged in ({**params, "vocabulary_crc32": params["vocabulary_crc32"] ^ 1}, {**params, "vocabulary": "AAAA"},
                    {**params, "layout": 3}):
        metadata = {**table.schema.metadata, SOFT_LABELS_KEY: json.dumps(damaged).encode()}
        with pytest.raises(tc.ShardFormatError, match="vocabulary|layout 3"):
            decode_table(table.replace_schema_metadata(metadata))


def test_compact_layout_2_shards_carry_schema_version_3_and_others_keep_2():
    """A reader from before layout 2 knows versions 1 and 2 only: it refuses these shards with
    "upgrade the teachercache client" instead of failing on columns it has never heard of."""
    from teachercache.shard_format import READABLE_VERSIONS, SCHEMA_VERSION_KEY

    table = pa.Table.from_pylist([], schema=JOB_SCHEMA)
    versions = {name: pq.read_schema(io.BytesIO(written(table, name))).metadata[SCHEMA_VERSION_KEY]
                for name in ("float32", "float16", "compact")}
    assert versions == {"float32": b"2", "float16": b"2", "compact": b"3"}
    assert pq.read_schema(io.BytesIO(written(table, Encoding("compact", STEP, 1)))).metadata[SCHEMA_VERSION_KEY] == b"2"
    assert {"1", "2", "3"} <= READABLE_VERSIONS


def test_compact_decodes_exactly_where_running_sums_leave_float32_range():
    """Unsorted logprobs 30,000 nats apart: the step deltas are too large for the float32 product
    that sums them, so the decoder sums in int64; values still within half a step."""
    values = [0.0 if j % 2 else -30000.0 for j in range(64)]
    rows = [{"custom_id": "q0", "request_index": 0, "sample_index": 0, "prompt_token_ids": [1],
             "completion_token_ids": [5], "completion_text": "a", "token_logprobs": [-30000.0],
             "top_token_ids": [list(range(64))], "top_logprobs": [values], "finish_reason": "length", "error": None,
             "cached": False}]
    back = read_back(written(pa.Table.from_pylist(rows, schema=JOB_SCHEMA), "compact")).to_pylist()[0]
    assert back["top_logprobs"] == [values] and back["token_logprobs"] == [-30000.0]
