"""workers/results.py: a result shard's columns are the same whether an engine gave Python lists
(remote, scripted) or numpy arrays (the vLLM adapter, laid into Arrow whole)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from teachercache.shard_format import RESULT_SCHEMA
from workers.engine import EngineResult, Sample
from workers.results import column_array, result_table


def sample(as_arrays: bool, positions: int = 3, k: int = 2) -> Sample:
    rng = np.random.default_rng(positions * 10 + k)
    top_ids = rng.integers(0, 49152, size=(positions, k)).astype(np.int32)
    top_logprobs = -rng.random((positions, k), dtype=np.float32)
    token_logprobs = -rng.random(positions, dtype=np.float32)
    ranks = rng.integers(1, 100, size=positions).astype(np.int32)
    tokens = rng.integers(0, 49152, size=positions).tolist()
    if as_arrays:
        return Sample(completion_token_ids=tokens, completion_text="x", token_logprobs=token_logprobs,
                      top_token_ids=top_ids, top_logprobs=top_logprobs, finish_reason="length", token_ranks=ranks)
    return Sample(completion_token_ids=tokens, completion_text="x", token_logprobs=token_logprobs.tolist(),
                  top_token_ids=top_ids.tolist(), top_logprobs=top_logprobs.tolist(), finish_reason="length",
                  token_ranks=ranks.tolist())


@pytest.mark.parametrize("shapes", [[(3, 2)], [(3, 2), (1, 2), (5, 2)], [(4, 0)], [(1, 20), (64, 20)]])
def test_arrays_and_lists_give_the_same_shard_rows(shapes):
    def table(as_arrays: bool) -> pa.Table:
        results = [EngineResult(key=f"k{i}", samples=[sample(as_arrays, n, k)]) for i, (n, k) in enumerate(shapes)]
        return result_table(results, {f"k{i}": [1, 2, 3] for i in range(len(shapes))})[0]

    from_arrays, from_lists = table(True), table(False)
    assert from_arrays.schema == RESULT_SCHEMA
    assert from_arrays.equals(from_lists)


def test_a_value_the_column_cannot_hold_raises_as_from_lists():
    too_big = [np.array([[2**31, 0]], dtype=np.int64)]
    with pytest.raises(pa.ArrowInvalid):
        column_array(too_big, pa.list_(pa.list_(pa.int32())))
    with pytest.raises(pa.ArrowInvalid):
        column_array([[[2**31, 0]]], pa.list_(pa.list_(pa.int32())))


def test_nulls_and_mixed_rows_take_the_converting_path():
    type_ = pa.list_(pa.int32())
    assert column_array([None, np.array([1, 2], dtype=np.int32)], type_).to_pylist() == [None, [1, 2]]
    assert column_array([[1], np.array([2, 3], dtype=np.int32)], type_).to_pylist() == [[1], [2, 3]]
