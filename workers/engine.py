"""The engine boundary: what a worker hands an engine and what it gets back.

Only the adapters (`workers/vllm_adapter.py`, ...) import an inference library; the loop,
the writer and the tests see these types alone, so a scripted engine can stand in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from service.sampling import Draws, Sampling

# What reaches an engine is the one definition of the sampling parameters (already normalised
# by the service); adapters map it field by field (vLLM's names are its names).
SamplingSpec = Sampling
__all__ = ["Draws", "Engine", "EngineRequest", "EngineResult", "PerPosition", "PerPositionTopK", "Sample", "SamplingSpec"]

# A sample's numbers, one per position ([positions]) or k per position ([positions, k]).
PerPosition = Sequence[float] | NDArray[np.generic]
PerPositionTopK = Sequence[Sequence[float]] | NDArray[np.generic]


@dataclass(frozen=True)
class EngineRequest:
    """One unit of teacher work. `key` is unique among the requests an engine holds."""

    key: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    top_logprobs: int
    mode: str = "generate"  # or "score"
    response_token_ids: list[int] | None = None
    # The chat messages the prompt was rendered from; only a remote chat endpoint needs them.
    messages: list[dict[str, Any]] | None = None
    # Sampled soft labels at every position, beside the top-k; None: top-k only.
    draws: Draws | None = None


@dataclass
class Sample:
    """One sample (generate) or the scored response (score), position-aligned.

    The per-position numbers are Python lists (engines that parse them, as from JSON), or numpy
    arrays, [positions] and [positions, k] (the vLLM adapter's, converted once from vLLM's flat
    lists): those go into the shard's Arrow buffers whole, without a Python object per number
    (workers/results.py)."""

    completion_token_ids: list[int]
    completion_text: str
    token_logprobs: PerPosition
    top_token_ids: PerPositionTopK
    top_logprobs: PerPositionTopK
    finish_reason: str  # stop | length | scored
    token_ranks: PerPosition | None = None  # each token's rank in the whole vocabulary, where the engine knows it
    # vLLM's `stop_reason` of a sample that stopped: the stop string or stop token id that ended it
    # (None: the end-of-sequence token, the length, or an engine that does not say).
    stop_reason: str | int | None = None
    # With draws: per position the unique drawn ids (most drawn first) and their counts.
    sample_token_ids: list[list[int]] | None = None
    sample_counts: list[list[int]] | None = None


@dataclass
class EngineResult:
    key: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None  # set when the engine rejected or failed this request alone


@runtime_checkable
class Engine(Protocol):
    """A continuously fed engine: add requests at any time, step to make progress."""

    def add(self, request: EngineRequest) -> None: ...

    def step(self) -> list[EngineResult]:
        """Run one scheduling step; return the requests that finished in it."""
        ...

    def has_unfinished(self) -> bool: ...

    def abort(self, keys: list[str]) -> None: ...

    def stats(self) -> dict[str, int]:
        """Counters of what the engine actually ran: requests, prompt_tokens, completion_tokens."""
        ...

    def close(self) -> None:
        """Release what the engine holds (vLLM's engine process, a remote client's threads and
        connections) now, not at interpreter exit; nothing is called on it afterwards."""
        ...
