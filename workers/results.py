"""From engine results to result-shard rows and cache-index entries."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from service.queue.repository import ClaimedTask
from service.sampling import split_draws
from teachercache.shard_format import RESULT_SCHEMA
from workers.engine import EngineRequest, EngineResult, Sample, SamplingSpec


def engine_request(task: ClaimedTask) -> EngineRequest:
    sampling, draws = split_draws(task.sampling)
    return EngineRequest(
        key=task.key, prompt_token_ids=list(task.prompt_token_ids), sampling=SamplingSpec.model_validate(sampling),
        top_logprobs=task.top_logprobs, mode=task.mode,
        response_token_ids=list(task.response_token_ids) if task.response_token_ids is not None else None,
        messages=task.messages, draws=draws,
    )


def result_rows(result: EngineResult, prompt: list[int]) -> list[dict[str, Any]]:
    return [
        {"cache_key": result.key, "sample_index": i, "prompt_token_ids": prompt,
         "completion_token_ids": s.completion_token_ids, "completion_text": s.completion_text,
         "token_logprobs": s.token_logprobs, "top_token_ids": s.top_token_ids, "top_logprobs": s.top_logprobs,
         "sample_token_ids": s.sample_token_ids, "sample_counts": s.sample_counts,
         "finish_reason": s.finish_reason, "error": None, "token_ranks": s.token_ranks,
         **stop_columns(s.stop_reason)}
        for i, s in enumerate(result.samples)
    ]


def stop_columns(stop_reason: str | int | None) -> dict[str, Any]:
    """vLLM's `stop_reason` (a string or a token id) in its two typed result-shard columns."""
    return {"stop_string": stop_reason if isinstance(stop_reason, str) else None,
            "stop_token_id": stop_reason if isinstance(stop_reason, int) else None}


def result_table(results: list[EngineResult], prompts: dict[str, list[int]]) -> tuple[pa.Table, list[dict[str, Any]]]:
    """The shard's rows, and for each result its index entry (row range, token counts)."""
    rows: list[dict[str, Any]] = []
    index = []
    for result in results:
        prompt = prompts[result.key]
        index.append({
            "cache_key": result.key, "row_start": len(rows), "row_count": len(result.samples),
            "prompt_tokens": len(prompt),
            "completion_tokens": sum(len(s.completion_token_ids) for s in result.samples),
        })
        rows.extend(result_rows(result, prompt))
    arrays = [column_array([row[field.name] for row in rows], field.type) for field in RESULT_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA), index


def column_array(values: list[Any], type_: pa.DataType) -> pa.Array:
    """One column of a result shard from its rows' values. Where every row holds a numpy array
    of the column's depth (the vLLM adapter's [positions] or [positions, k]), the arrays are
    laid into Arrow's buffers whole: no Python object per number. Anything else (Python lists,
    nulls, scalars) pyarrow converts. Either way a value the type cannot hold (a token id past
    int32) raises, so the writer fails that result alone."""
    depth = _list_depth(type_)
    if values and depth and all(isinstance(v, np.ndarray) and v.ndim == depth for v in values):
        return _list_array(values, type_)
    return pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in values], type=type_)


def _list_depth(type_: pa.DataType) -> int:
    depth = 0
    while pa.types.is_list(type_):
        type_, depth = type_.value_type, depth + 1
    return depth


def _list_array(values: list[np.ndarray], type_: pa.DataType) -> pa.Array:
    """list<T> from 1-D arrays, list<list<T>> from 2-D arrays (each row's inner lists all of its width)."""
    outer = _offsets([v.shape[0] for v in values])
    if _list_depth(type_) == 1:
        return pa.ListArray.from_arrays(outer, pa.array(np.concatenate(values), type=type_.value_type))
    inner = _offsets(np.concatenate([np.full(v.shape[0], v.shape[1] if v.shape[0] else 0) for v in values]))
    flat = pa.array(np.concatenate([v.reshape(-1) for v in values]), type=type_.value_type.value_type)
    return pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(inner, flat))


def _offsets(lengths: Any) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets)


def warm_up() -> None:
    """Build a one-row result table once, at start-up: pyarrow's first conversion of Python
    lists imports pandas (~0.3-0.45 s of CPU), which would otherwise land in the first shard's
    write, on the engine's CPU."""
    sample = Sample(completion_token_ids=[0], completion_text="", token_logprobs=[0.0], top_token_ids=[[0]],
                    top_logprobs=[[0.0]], finish_reason="length")
    result_table([EngineResult(key="warm-up", samples=[sample])], {"warm-up": [0]})
