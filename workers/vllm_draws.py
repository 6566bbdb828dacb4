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
  gathers only the top-k the batch needs, and for the rows that asked, the draws are made and
  reduced to unique ids and counts on the device (`draw_counts`): after the row's token and
  top-k come its unique drawn ids (most drawn first), their counts as floats in the logprob
  column, then padding (id 0, count 0). A generated row goes out 1 + k + U wide, U the most
  unique ids of any row in that step's batch; a prompt's rows go out 1 + k + U wide, U the most
  unique ids of any of its positions. So what crosses to the worker per position is
  O(k + unique draws), never N padding columns and never the vocabulary (vLLM's output
  processor keeps at most 1 + k + N of a row, so other rows' width never reaches a request).
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

All of this is vLLM's V1 model runner (the CPU build's only one); the V2 runner, vLLM 0.32's
default on a GPU with Triton, samples through its own Triton kernels and is not hooked:
`prefer_hooked_runner` asks for V1 and `runs_hooked_runner` tells the adapter which one an engine
got (docs/soft-labels.md, "Which vLLM model runner").
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from pydantic import ValidationError

from service.sampling import MAX_DRAWS, Draws

__all__ = ["MAX_DRAWS", "PLUGIN_NAME", "apply", "check_hooked_sources", "draw_counts", "extra_args", "plugin_registered", "spec_of"]

PLUGIN_NAME = "teachercache_draws"
EXTRA_ARG = "teachercache_draws"
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"

SUPPORTED_VLLM = ("0.32.0",)
# sha256 of inspect.getsource(...) of each function whose behaviour (call sites, local names)
# the hook relies on, for the supported vLLM version. Recompute with `hooked_source_hashes()`
# after reading the new code, never blindly.
HOOKED_SOURCES = {
    "vllm.v1.sample.sampler.Sampler.forward": "586fe802add4fd74a4cafa76bab4265223e079056af221dde521d6f9bc3e0dad",
    "vllm.v1.sample.sampler.Sampler.gather_logprobs": "ca39ba3c4e61572e6f8e8a9d8c14389e8f7d3f965cf9eab21c6c94bf36bfd890",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample": "5cb5c1da02cfdc689acb7bab51ca7eb56e2ef3b19bea4b92fc6ca4370be2cf5a",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_prompt_logprobs_dict": "889fdb068dfc37ddf4827e8f3af2d99ff790fbd3c77ff4a05eec1e3d0f1f560f",
    # Not hooked, relied on: how vLLM picks the V1 runner the hook covers (prefer_hooked_runner).
    "vllm.config.vllm.VllmConfig.use_v2_model_runner": "515385db129cfb7378cffe949c37bdfb606c208e46e0a2b825ae5deaebd408e3",
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `logprobs` (raw, [rows, vocab]), `specs[i].draws` tokens drawn with
    replacement from softmax(logprobs[i] / T_i), reduced to (unique ids, counts) on the
    device: two [rows, width] int32 tensors on `logprobs`' device, width the most unique ids
    of any row; each row's ids most drawn first (ties by id), then padding (id 0, count 0).

    Inverse-CDF sampling: the uniforms come from a CPU generator seeded per (seed, position)
    (N numbers per row, reproducible on any device); the O(vocabulary) work (softmax,
    cumulative sum in float64, search) and the reduction to unique ids (sort, run boundaries,
    scatter-add, sort by count) stay on the device, so only the unique ids leave it."""
    rows, vocab = len(specs), logprobs.shape[-1]
    device = logprobs.device
    temps = torch.tensor([s.temperature for s in specs], dtype=torch.float32, device=device)
    probs = torch.softmax(logprobs.to(torch.float32) / temps.unsqueeze(1), dim=-1)
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    width = max(s.draws for s in specs)
    uniforms = torch.zeros(rows, width, dtype=torch.float64)
    for i, (spec, position) in enumerate(zip(specs, positions, strict=True)):
        generator = torch.Generator().manual_seed(position_seed(spec.seed, position))
        uniforms[i, : spec.draws] = torch.rand(spec.draws, generator=generator, dtype=torch.float64)
    targets = uniforms.to(device) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, targets, right=True).clamp_(max=vocab - 1)
    # A row with fewer draws than the widest: its spare columns hold `vocab`, which sorts last
    # and is counted zero times.
    wanted = torch.tensor([s.draws for s in specs], device=device).unsqueeze(1)
    drawn = torch.where(torch.arange(width, device=device) < wanted, drawn, vocab)
    return unique_counts(drawn, vocab)


def unique_counts(drawn: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `drawn` ([rows, n] token ids; the value `vocab` marks no draw), the unique ids
    and how often each was drawn, most drawn first (ties by id), zero-padded to the most unique
    ids of any row; batched torch ops on `drawn`'s device (one host sync: that width)."""
    ordered, _ = drawn.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = starts.cumsum(dim=1) - 1  # which unique id (in id order) each draw is
    counts = torch.zeros_like(ordered).scatter_add_(1, run, (ordered < vocab).to(ordered.dtype))
    ids = torch.zeros_like(ordered).scatter_(1, run, ordered)  # every draw of a run writes the same id
    # Most drawn first, ties by id; unused slots (count 0) last.
    key = (drawn.shape[1] + 1 - counts) * (vocab + 1) + ids
    order = key.argsort(dim=1)
    counts, ids = counts.gather(1, order), ids.gather(1, order)
    ids.masked_fill_(counts == 0, 0)
    width = int((counts > 0).sum(dim=1).max()) if counts.numel() else 0
    return ids[:, :width].to(torch.int32), counts[:, :width].to(torch.int32)


class DrawRow(NamedTuple):
    """A batch row that asked for draws: where it is, its top-k, its draws and its position."""

    row: int
    k: int
    spec: Draws
    position: int


def with_draws(
    token_ids: torch.Tensor,
    logprobs_out: torch.Tensor,
    full_logprobs: torch.Tensor,
    rows: list[DrawRow],
    top: int,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather's output ([batch, 1 + at least `top`]: the token, then the top-`top`) with
    each draw row's unique drawn ids and counts (as floats) after its own token and top-k.
    The width is 1 + the most any row needs (its top-k plus its unique ids; `top` for rows
    without draws: one more host sync), or `pad_to` where the caller's buffers are that wide; what a draw row
    does not fill is id 0, count 0."""
    index = torch.tensor([r.row for r in rows], dtype=torch.long, device=full_logprobs.device)
    ids, counts = draw_counts(full_logprobs.index_select(0, index), [r.spec for r in rows], [r.position for r in rows])
    ks = torch.tensor([r.k for r in rows], device=counts.device)
    width = 1 + max(top, int(((counts > 0).sum(dim=1) + ks).max()))
    if pad_to is not None:
        width = max(width, pad_to)
    kept = min(token_ids.shape[1], 1 + top)
    out_ids = token_ids.new_zeros((token_ids.shape[0], width))
    out_lps = logprobs_out.new_zeros((logprobs_out.shape[0], width))
    out_ids[:, :kept] = token_ids[:, :kept]
    out_lps[:, :kept] = logprobs_out[:, :kept]
    # One block write per distinct top-k (a job's rows share one): the row's columns after its
    # top-k are its drawn ids then zeros (never another row's wider top-k).
    for k in sorted({r.k for r in rows}):
        members = torch.tensor([i for i, r in enumerate(rows) if r.k == k], dtype=torch.long, device=index.device)
        room = width - 1 - k  # at least each member's unique ids: past them, only padding is cut
        used = min(room, ids.shape[1])
        block_ids = ids.new_zeros((len(members), room))
        block_counts = counts.new_zeros((len(members), room))
        block_ids[:, :used] = ids.index_select(0, members)[:, :used]
        block_counts[:, :used] = counts.index_select(0, members)[:, :used]
        targets = index.index_select(0, members).to(out_ids.device)
        out_ids[targets, 1 + k :] = block_ids.to(out_ids)
        out_lps[targets, 1 + k :] = block_counts.to(out_lps)
    return out_ids, out_lps


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


def _generated_rows(runner: Any, width: int) -> tuple[list[DrawRow], int]:
    """The batch rows whose request asked for draws, and the top-k columns the batch needs
    (the widest of the draw rows' top-k and the other rows' logprobs)."""
    rows, top = [], 0
    for row, req_id in enumerate(runner.input_batch.req_ids):
        state: Any = runner.requests.get(req_id) if req_id is not None else None
        params: Any = getattr(state, "sampling_params", None)
        if params is None:
            top = width - 1  # a row we cannot read keeps everything it may have asked for
            continue
        asked = int(params.logprobs) if params.logprobs is not None else 0
        spec = spec_of(params.extra_args)
        # A scoring request's one generated token is discarded and asks for no logprobs.
        k = asked - spec.draws if spec is not None else -1
        # Never raise inside the engine step (it would kill the engine for every request):
        # a row without room keeps plain logprobs, which the adapter refuses as "no draws".
        if spec is None or params.logprobs is None or k < 0 or 1 + asked > width:
            top = max(top, min(asked, width - 1))
            continue
        top = max(top, k)
        rows.append(DrawRow(row, k, _per_sample(spec, params.seed), len(state.output_token_ids)))
    return rows, top


def _prompt_rows(runner: Any, width: int, num_rows: int) -> tuple[list[DrawRow], int]:
    caller = sys._getframe(2)  # _get_prompt_logprobs_dict, through the patched gather
    if caller.f_code.co_name != "_get_prompt_logprobs_dict" or "req_id" not in caller.f_locals:
        raise RuntimeError("teachercache draws: the prompt-logprob gather moved (vLLM upgrade?)")
    req_id, start = caller.f_locals["req_id"], int(caller.f_locals["start_idx"])
    params = runner.requests[req_id].sampling_params
    spec = spec_of(params.extra_args)
    k = width - 1 - (spec.draws if spec is not None else 0)
    if spec is None or k < 0:
        return [], width - 1
    spec = _per_sample(spec, params.seed)
    return [DrawRow(i, k, spec, start + i) for i in range(num_rows)], k


def _per_sample(spec: Draws, sampling_seed: int | None) -> Draws:
    """The draws' seed for one of a request's n samples: vLLM gives sample i the sampling seed
    seed + i, which is mixed in, so the samples' draws are independent (and still reproducible)."""
    return spec.model_copy(update={"seed": position_seed(spec.seed, -1 - (sampling_seed or 0))})


def _patched_gather(original: Callable[..., Any]) -> Callable[..., Any]:
    def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> Any:
        context = getattr(_state, "context", None)
        if context is None:
            return original(logprobs, num_logprobs, token_ids)
        kind, runner = context
        width = num_logprobs + 1
        if kind == "generate":
            rows, top = _generated_rows(runner, width)
        else:
            rows, top = _prompt_rows(runner, width, logprobs.shape[0])
        if not rows:
            return original(logprobs, num_logprobs, token_ids)
        # The top-k the batch needs, not the k + N columns asked for (those are the draws').
        result = original(logprobs, top, token_ids)
        # Generated rows go out as they are (so 1 + k + the batch's most unique ids); a prompt
        # chunk is copied into a buffer vLLM made k + N + 1 wide, narrowed once the prompt is
        # done (_narrow_prompt_logprobs).
        ids, counts = with_draws(result.logprob_token_ids, result.logprobs, logprobs, rows, top,
                                 pad_to=None if kind == "generate" else width)
        return result._replace(logprob_token_ids=ids, logprobs=counts)

    gather_logprobs.__wrapped__ = original  # type: ignore[attr-defined]
    return gather_logprobs


def _narrow_prompt_logprobs(runner: Any, done: dict[str, Any]) -> dict[str, Any]:
    """The finished prompts' logprobs (CPU tensors, k + N + 1 wide) cut to 1 + k + the most
    unique ids of any of the request's positions: what goes to the engine core and on."""
    for req_id, tensors in done.items():
        state = runner.requests.get(req_id)
        spec = spec_of(getattr(getattr(state, "sampling_params", None), "extra_args", None))
        if tensors is None or spec is None:
            continue
        k = tensors.logprobs.shape[1] - 1 - spec.draws
        if k < 0:
            continue
        unique = int((tensors.logprobs[:, 1 + k :] > 0).sum(dim=1).max()) if tensors.logprobs.shape[0] else 0
        width = 1 + k + unique
        done[req_id] = tensors._replace(logprob_token_ids=tensors.logprob_token_ids[:, :width].contiguous(),
                                        logprobs=tensors.logprobs[:, :width].contiguous())
    return done


def _in_context(
    kind: str, original: Callable[..., Any], after: Callable[[Any, Any], Any] | None = None
) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _context(kind, self):
            result = original(self, *args, **kwargs)
        return result if after is None else after(self, result)

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
        func: Any = obj.fget if isinstance(obj, property) else obj.__func__ if isinstance(obj, staticmethod) else obj
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


def prefer_hooked_runner() -> None:
    """Ask vLLM for the model runner the hook covers, unless the environment chose one.

    vLLM 0.32 has two: V1 (`vllm.v1.worker.gpu_model_runner.GPUModelRunner`, whose CPU
    subclass is the only runner of the CPU build) and V2 (`vllm.v1.worker.gpu.model_runner`,
    the default on a GPU with Triton), whose sampler computes logprobs with its own Triton
    kernels (`gpu.sample.logprob.compute_topk_scores`) and never calls the code hooked here.
    V1 is still a supported runner on a GPU in 0.32 and the hook is plain torch on whatever
    device the logprobs are on, so a GPU worker that can draw runs V1 (set
    VLLM_USE_V2_MODEL_RUNNER=1 for V2 without sampled labels)."""
    os.environ.setdefault(V2_RUNNER_ENV, "0")


def runs_hooked_runner(vllm_config: Any) -> bool:
    """Whether an engine with this config runs the runner the hook covers (V1): vLLM's own
    decision (the environment, Triton, features that force V2), read where the engine is made."""
    return not bool(getattr(vllm_config, "use_v2_model_runner", False))


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
    from vllm.logger import init_logger
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    Sampler.gather_logprobs = staticmethod(_patched_gather(Sampler.gather_logprobs))
    GPUModelRunner._sample = _in_context("generate", GPUModelRunner._sample)
    GPUModelRunner._get_prompt_logprobs_dict = _in_context(
        "prompt", GPUModelRunner._get_prompt_logprobs_dict, after=_narrow_prompt_logprobs
    )
    _APPLIED = True
    # Which copy of the hook this engine process runs (an editable install and PYTHONPATH can differ).
    init_logger("vllm.teachercache_draws").info("teachercache draws hook installed from %s", __file__)
