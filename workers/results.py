"""From engine results to result-shard rows and cache-index entries."""

from __future__ import annotations

from typing import Any

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
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), index


def warm_up() -> None:
    """Build a one-row result table once, at start-up: pyarrow's first conversion of Python
    lists imports pandas (~0.3-0.45 s of CPU), which would otherwise land in the first shard's
    write, on the engine's CPU."""
    sample = Sample(completion_token_ids=[0], completion_text="", token_logprobs=[0.0], top_token_ids=[[0]],
                    top_logprobs=[[0.0]], finish_reason="length")
    result_table([EngineResult(key="warm-up", samples=[sample])], {"warm-up": [0]})
