"""A scripted, in-memory engine for control-plane tests: deterministic, instant, no model.

It is not a teacher: its "logprobs" are a function of the prompt, seed and position, so tests
of the queue, cache and shards can check that every row lands where it belongs. Prompts that
contain one of `fail_tokens` come back as a per-request error; one of `crash_tokens` makes
`step()` raise, like an engine that died.
"""

from __future__ import annotations

import hashlib
import math
import time

from workers.engine import EngineRequest, EngineResult, Sample


def _unit(*parts: object) -> float:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class ScriptedEngine:
    def __init__(self, vocab_size: int = 49152, step_delay_s: float = 0.0, tokens_per_step: int = 4,
                 fail_tokens: frozenset[int] = frozenset(), crash_tokens: frozenset[int] = frozenset()) -> None:
        self.vocab_size = vocab_size
        self.fail_tokens = fail_tokens
        self.crash_tokens = crash_tokens
        self.step_delay_s = step_delay_s
        self.tokens_per_step = tokens_per_step
        self.running: dict[str, EngineRequest] = {}
        self.progress: dict[str, int] = {}
        self.counters = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def add(self, request: EngineRequest) -> None:
        self.running[request.key] = request
        self.progress[request.key] = 0

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def abort(self, keys: list[str]) -> None:
        for key in keys:
            self.running.pop(key, None)
            self.progress.pop(key, None)

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        """Nothing to release: it holds no process, thread or connection."""
        self.abort(list(self.running))

    def step(self) -> list[EngineResult]:
        time.sleep(self.step_delay_s)
        finished = []
        for key, request in list(self.running.items()):
            if self.crash_tokens.intersection(request.prompt_token_ids):
                raise RuntimeError("scripted engine crash")
            self.progress[key] += self.tokens_per_step
            if self.progress[key] >= self._length(request) or self._fails(request):
                finished.append(self._finish(request))
        return finished

    def _fails(self, request: EngineRequest) -> bool:
        return bool(self.fail_tokens.intersection(request.prompt_token_ids))

    def _length(self, request: EngineRequest) -> int:
        if request.mode == "score":
            return len(request.response_token_ids or [])
        return request.sampling.max_tokens

    def _finish(self, request: EngineRequest) -> EngineResult:
        self.abort([request.key])
        if self._fails(request):
            return EngineResult(key=request.key, error="scripted failure")
        samples = [self._sample(request, i) for i in range(1 if request.mode == "score" else request.sampling.n)]
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(request.prompt_token_ids)
        self.counters["completion_tokens"] += sum(len(s.completion_token_ids) for s in samples)
        return EngineResult(key=request.key, samples=samples)

    def _sample(self, request: EngineRequest, index: int) -> Sample:
        k = request.top_logprobs
        seed = (tuple(request.prompt_token_ids), request.sampling.seed, index)
        if request.mode == "score":
            tokens = list(request.response_token_ids or [])
        else:
            tokens = [int(_unit(seed, p) * self.vocab_size) for p in range(request.sampling.max_tokens)]
        tops = [sorted((int(_unit(seed, p, j) * self.vocab_size) for j in range(k)), reverse=True) for p in range(len(tokens))]
        logps = [[-(j + 1) * 0.5 - _unit(seed, p) for j in range(k)] for p in range(len(tokens))]
        token_logps = [-math.log(2) - _unit(seed, p, "t") for p in range(len(tokens))]
        return Sample(completion_token_ids=tokens, completion_text=" ".join(map(str, tokens)),
                      token_logprobs=token_logps, top_token_ids=tops, top_logprobs=logps,
                      finish_reason="scored" if request.mode == "score" else "length")
