"""Sampled soft labels inside vLLM's engine step: a vLLM general plugin.

Random-sampling distillation targets (Anshumann et al., ACL 2025) need, per position, N
tokens drawn with replacement from the teacher's full raw distribution at a temperature T.
That distribution exists only inside the engine's step, on its device; asking vLLM for the
full-vocabulary logprobs of every position to draw in the worker would move O(vocabulary)
per position. So this module hooks vLLM's logprob gather, in every engine process (the
entry point group `vllm.general_plugins` is loaded in the engine core and its workers too):

- A request asks for draws through `SamplingParams.extra_args[EXTRA_ARG]` =
  `{"draws": N, "temperature": T, "seed": S}` and asks for N more logprobs than its top-k
  (`logprobs = k + N` when generating, `prompt_logprobs = k + N` when scoring).
- `Sampler.gather_logprobs` (raw logprobs of the whole batch, float32, on the device) then
  runs unchanged, and for the rows that asked, the N extra columns after the top-k are
  overwritten with the unique drawn ids (most drawn first) and their counts (as floats;
  padding is id 0 with count 0). What crosses to the worker per position is k + N + 1
  numbers, never the vocabulary.
- The draws come from their own generator, seeded per (S, position), so the same request
  gets the same draws whatever it was batched with; they run after the token was sampled
  and read the logprobs only, so what is generated is exactly what it is without them.

Which batch row is which request is known to the model runner, not to the sampler: the
runner's `_sample` (generated positions) and `_get_prompt_logprobs_dict` (prompt positions)
are wrapped to tell the gather. For prompt positions the gather is called once per request
from a loop; the request and the offset of its chunk are that loop's `req_id` and
`start_idx` (read from the caller's frame). These are vLLM internals: `HOOKED_SOURCES` pins
the hash of each hooked function's source for the supported vLLM version, and
`check_hooked_sources()` (run by the test suite and by `apply()` itself) fails loudly when an
upgrade changes any of them.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from service.sampling import MAX_DRAWS, Draws

__all__ = ["MAX_DRAWS", "PLUGIN_NAME", "apply", "check_hooked_sources", "draw_counts", "extra_args", "plugin_registered", "spec_of"]

PLUGIN_NAME = "teachercache_draws"
EXTRA_ARG = "teachercache_draws"

SUPPORTED_VLLM = ("0.32.0",)
# sha256 of inspect.getsource(...) of each function whose behaviour (call sites, local names)
# the hook relies on, for the supported vLLM version. Recompute with `hooked_source_hashes()`
# after reading the new code, never blindly.
HOOKED_SOURCES = {
    "vllm.v1.sample.sampler.Sampler.forward": "586fe802add4fd74a4cafa76bab4265223e079056af221dde521d6f9bc3e0dad",
    "vllm.v1.sample.sampler.Sampler.gather_logprobs": "ca39ba3c4e61572e6f8e8a9d8c14389e8f7d3f965cf9eab21c6c94bf36bfd890",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample": "5cb5c1da02cfdc689acb7bab51ca7eb56e2ef3b19bea4b92fc6ca4370be2cf5a",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_prompt_logprobs_dict": "889fdb068dfc37ddf4827e8f3af2d99ff790fbd3c77ff4a05eec1e3d0f1f560f",
}

_APPLIED = False


def spec_of(extra: dict[str, Any] | None) -> Draws | None:
    """The draws a request carries in its extra_args; None without any or with malformed ones
    (the hook never raises in the engine step; the adapter then finds no draws and says so)."""
    if not extra or EXTRA_ARG not in extra:
        return None
    try:
        return Draws.model_validate(extra[EXTRA_ARG])
    except ValidationError:
        return None


def extra_args(draws: Draws) -> dict[str, Any]:
    return {EXTRA_ARG: draws.model_dump()}


# -- the draws themselves (pure torch; tested without an engine) ------------------------


def position_seed(seed: int, position: int) -> int:
    """A 63-bit seed per (request seed, position): splitmix64 of the pair, so nearby seeds
    and positions give unrelated streams."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def draw_counts(
    logprobs: torch.Tensor, specs: list[Draws], positions: list[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each row of `logprobs` (raw, [rows, vocab]), `specs[i].draws` tokens drawn with
    replacement from softmax(logprobs[i] / T_i); returns per row (unique ids, counts), most
    drawn first (ties by id). Inverse-CDF sampling: the uniforms come from a CPU generator
    seeded per (seed, position) — N numbers per row, reproducible on any device — and the
    O(vocabulary) work (softmax, cumulative sum in float64, search) stays on the device."""
    rows = len(specs)
    temps = torch.tensor([s.temperature for s in specs], dtype=torch.float32, device=logprobs.device)
    probs = torch.softmax(logprobs.to(torch.float32) / temps.unsqueeze(1), dim=-1)
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    width = max(s.draws for s in specs)
    uniforms = torch.zeros(rows, width, dtype=torch.float64)
    for i, (spec, position) in enumerate(zip(specs, positions, strict=True)):
        generator = torch.Generator().manual_seed(position_seed(spec.seed, position))
        uniforms[i, : spec.draws] = torch.rand(spec.draws, generator=generator, dtype=torch.float64)
    targets = uniforms.to(logprobs.device) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, targets, right=True).clamp_(max=logprobs.shape[-1] - 1).cpu().numpy()
    out = []
    for i, spec in enumerate(specs):
        ids, counts = np.unique(drawn[i, : spec.draws], return_counts=True)
        order = np.lexsort((ids, -counts))
        out.append((ids[order].astype(np.int32), counts[order].astype(np.int32)))
    return out


def write_draws(
    token_ids: torch.Tensor,
    logprobs_out: torch.Tensor,
    full_logprobs: torch.Tensor,
    rows: list[tuple[int, int, Draws, int]],
) -> None:
    """Overwrite, for each (row, top-k, spec, position), the spec.draws columns after the
    row's sampled token and top-k with the drawn ids and counts (zero-padded)."""
    if not rows:
        return
    index = torch.tensor([r[0] for r in rows], dtype=torch.long, device=full_logprobs.device)
    drawn = draw_counts(full_logprobs.index_select(0, index), [r[2] for r in rows], [r[3] for r in rows])
    for (row, k, spec, _), (ids, counts) in zip(rows, drawn, strict=True):
        ids_col = np.zeros(spec.draws, dtype=np.int32)
        counts_col = np.zeros(spec.draws, dtype=np.float32)
        ids_col[: len(ids)] = ids
        counts_col[: len(counts)] = counts
        first = 1 + k
        token_ids[row, first : first + spec.draws] = torch.from_numpy(ids_col).to(token_ids.device)
        logprobs_out[row, first : first + spec.draws] = torch.from_numpy(counts_col).to(logprobs_out.device)


# -- the hook -----------------------------------------------------------------------------

_state = threading.local()


@contextmanager
def _context(kind: str, runner: Any) -> Iterator[None]:
    previous = getattr(_state, "context", None)
    _state.context = (kind, runner)
    try:
        yield
    finally:
        _state.context = previous


def _generated_rows(runner: Any, width: int) -> list[tuple[int, int, Draws, int]]:
    """The batch rows whose request asked for draws: (row, its top-k, spec, position)."""
    rows = []
    for row, req_id in enumerate(runner.input_batch.req_ids):
        state: Any = runner.requests.get(req_id) if req_id is not None else None
        params: Any = getattr(state, "sampling_params", None)
        spec = spec_of(getattr(params, "extra_args", None))
        # A scoring request's one generated token is discarded and asks for no logprobs.
        if spec is None or params.logprobs is None:
            continue
        k = int(params.logprobs) - spec.draws
        # Never raise inside the engine step (it would kill the engine for every request):
        # a row without room keeps plain logprobs, which the adapter refuses as "no draws".
        if k < 0 or 1 + k + spec.draws > width:
            continue
        rows.append((row, k, _per_sample(spec, params.seed), len(state.output_token_ids)))
    return rows


def _prompt_rows(runner: Any, width: int, num_rows: int) -> list[tuple[int, int, Draws, int]]:
    caller = sys._getframe(2)  # _get_prompt_logprobs_dict, through the patched gather
    if caller.f_code.co_name != "_get_prompt_logprobs_dict" or "req_id" not in caller.f_locals:
        raise RuntimeError("teachercache draws: the prompt-logprob gather moved (vLLM upgrade?)")
    req_id, start = caller.f_locals["req_id"], int(caller.f_locals["start_idx"])
    params = runner.requests[req_id].sampling_params
    spec = spec_of(params.extra_args)
    if spec is None:
        return []
    k = width - 1 - spec.draws
    if k < 0:
        return []
    spec = _per_sample(spec, params.seed)
    return [(i, k, spec, start + i) for i in range(num_rows)]


def _per_sample(spec: Draws, sampling_seed: int | None) -> Draws:
    """The draws' seed for one of a request's n samples: vLLM gives sample i the sampling seed
    seed + i, which is mixed in, so the samples' draws are independent (and still reproducible)."""
    return spec.model_copy(update={"seed": position_seed(spec.seed, -1 - (sampling_seed or 0))})


def _patched_gather(original: Callable[..., Any]) -> Callable[..., Any]:
    def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> Any:
        result = original(logprobs, num_logprobs, token_ids)
        context = getattr(_state, "context", None)
        if context is None:
            return result
        kind, runner = context
        width = num_logprobs + 1
        if kind == "generate":
            rows = _generated_rows(runner, width)
        else:
            rows = _prompt_rows(runner, width, logprobs.shape[0])
        write_draws(result.logprob_token_ids, result.logprobs, logprobs, rows)
        return result

    gather_logprobs.__wrapped__ = original  # type: ignore[attr-defined]
    return gather_logprobs


def _in_context(kind: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _context(kind, self):
            return original(self, *args, **kwargs)

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__name__ = original.__name__
    return wrapper


def _resolve(dotted: str) -> Any:
    module_name, cls_name, attr = dotted.rsplit(".", 2)
    module = __import__(module_name, fromlist=[cls_name])
    return inspect.getattr_static(getattr(module, cls_name), attr)


def hooked_source_hashes() -> dict[str, str]:
    """The current sha256 of each hooked function's source (unwrapped)."""
    out = {}
    for dotted in HOOKED_SOURCES:
        obj = _resolve(dotted)
        func = obj.__func__ if isinstance(obj, staticmethod) else obj
        func = inspect.unwrap(func)
        out[dotted] = hashlib.sha256(inspect.getsource(func).encode()).hexdigest()
    return out


def check_hooked_sources() -> None:
    """Raise if the installed vLLM is not one this hook was written against."""
    import vllm

    if vllm.__version__ not in SUPPORTED_VLLM:
        raise RuntimeError(f"teachercache draws support vLLM {SUPPORTED_VLLM}, found {vllm.__version__}")
    moved = [name for name, digest in hooked_source_hashes().items() if digest != HOOKED_SOURCES[name]]
    if moved:
        raise RuntimeError(f"teachercache draws: vLLM's hooked code changed: {moved}; re-read and re-pin it")


def plugin_registered() -> bool:
    """Whether this environment's entry points name the plugin (vLLM loads exactly those)."""
    from importlib.metadata import entry_points

    return any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.general_plugins"))


def apply() -> None:
    """The `vllm.general_plugins` entry point: install the hook (idempotent; vLLM calls it
    once in every process it starts)."""
    global _APPLIED
    if _APPLIED:
        return
    check_hooked_sources()
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    Sampler.gather_logprobs = staticmethod(_patched_gather(Sampler.gather_logprobs))
    GPUModelRunner._sample = _in_context("generate", GPUModelRunner._sample)
    GPUModelRunner._get_prompt_logprobs_dict = _in_context(
        "prompt", GPUModelRunner._get_prompt_logprobs_dict
    )
    _APPLIED = True
