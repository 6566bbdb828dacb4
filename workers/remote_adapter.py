"""The remote engine adapter: a teacher behind an OpenAI-compatible endpoint (`/v1/completions`,
or `/v1/chat/completions`).

`RemoteEngine` implements `workers.engine.Engine` without vLLM: `add()` hands the request to
a thread pool of `max_concurrency` HTTP threads, `step()` returns what finished. Each request
is sent with the prompt as token ids (exactly the tokens the cache key was computed from),
asks for `logprobs` = top-k, and with vLLM's extensions (on by default) also for the token
ids themselves (`return_tokens_as_token_ids`, `return_token_ids`) and, in score mode, for
`prompt_logprobs`. Against a `vllm serve --logprobs-mode raw_logprobs` the rows are the ones
the local adapter writes (docs/remote-teachers.md lists where the two paths differ).

Politeness: every request first waits on the budget (requests and tokens per minute, and
any pause a 429 asked for); 429, 5xx and connection errors are retried with exponential
backoff and jitter (tenacity), honouring `Retry-After`. A request that keeps failing comes
back as an `EngineResult` error, "remote teacher HTTP <status>: <body excerpt>", which the
worker loop records as a failed attempt like any other.

The API key is read from the environment by the caller and only ever sent in the
Authorization header; error excerpts are scrubbed of it in case a server echoes it back.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from service.sampling import engine_only_names, openai_names
from service.teachers.registry import RemoteSource
from teachercache.errors import parse_retry_after
from workers.engine import EngineRequest, EngineResult, Sample, SamplingSpec
from workers.remote_budget import Budget
from workers.remote_tokens import UNMAPPED, TokenMapper, parse_token_id

log = logging.getLogger(__name__)

EXCERPT_CHARS = 300
STEP_WAIT_S = 0.05  # step() waits this long for a finished request, so the engine thread idles cheaply
OPENAI_FLOOR = -9999.0  # OpenAI-compatible servers write -inf logprobs as -9999.0; we store -inf
# Sampling fields a plain OpenAI server has no parameter for: only their defaults can be honoured.
VLLM_ONLY_DEFAULTS = {name: SamplingSpec.model_fields[name].default for name in engine_only_names()}


class RemoteRequestFailed(Exception):
    """One request failed for good (after the retries, or at once for a 4xx)."""


class RetryableHTTPError(Exception):
    def __init__(self, status: int, excerpt: str, retry_after: float | None) -> None:
        super().__init__(f"remote teacher HTTP {status}: {excerpt}")
        self.status = status
        self.retry_after = retry_after


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, (RetryableHTTPError, httpx.TransportError))


class RetryAfterOrBackoff:
    """Wait what the server's `Retry-After` asked for, else exponential backoff with jitter."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.backoff = wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=initial_s)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(retry_after)  # honoured in full, never shortened
        return self.backoff(state)


class Counters:
    """Thread-safe integer counters (the engine's stats)."""

    def __init__(self, *names: str) -> None:
        self._values = dict.fromkeys(names, 0)
        self._lock = threading.Lock()

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._values[name] = self._values.get(name, 0) + amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class RemoteClient:
    """POSTs to the endpoint: pooled connections, timeouts, the budget, the retry policy."""

    def __init__(self, source: RemoteSource, api_key: str | None, *, budget: Budget | None = None,
                 counters: Counters | None = None, sleep: Callable[[float], None] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.source = source
        self._secret = api_key
        self.closed = threading.Event()
        self.sleep = sleep or self._sleep_unless_closed
        self.budget = budget or Budget(source.requests_per_minute, source.tokens_per_minute, sleep=self.sleep)
        self.counters = counters or Counters()
        self.path = "/chat/completions" if source.api == "chat" else "/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=source.base_url.rstrip("/"), headers=headers, transport=transport,
            timeout=httpx.Timeout(source.timeout_s, connect=min(10.0, source.timeout_s)),
            limits=httpx.Limits(max_connections=source.max_concurrency,
                                max_keepalive_connections=source.max_concurrency),
        )

    def complete(self, body: dict[str, Any], tokens: int) -> dict[str, Any]:
        """POST to the endpoint until it succeeds, fails for good, or the retries run out."""
        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            wait=RetryAfterOrBackoff(self.source.backoff_initial_s, self.source.backoff_max_s),
            stop=stop_after_attempt(self.source.max_retries + 1),
            sleep=self.sleep, reraise=True, before_sleep=self._count_retry,
        )
        try:
            return retrying(self._post_once, self.path, body, tokens)
        except RetryableHTTPError as exc:
            raise RemoteRequestFailed(str(exc)) from None
        except httpx.TransportError as exc:
            raise RemoteRequestFailed(self._scrub(f"remote teacher connection error: {type(exc).__name__}: {exc}")) \
                from None

    def _post_once(self, path: str, body: dict[str, Any], tokens: int) -> dict[str, Any]:
        self.budget.acquire(tokens)
        self.counters.add(http_requests=1)
        response = self.http.post(path, json=body)
        if response.status_code == 429 or response.status_code >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if response.status_code == 429:
                self.counters.add(http_rate_limited=1)
                # Every thread of this worker holds back, not just this one.
                self.budget.pause(retry_after if retry_after is not None else self.source.backoff_initial_s)
            raise RetryableHTTPError(response.status_code, self._excerpt(response), retry_after)
        if response.status_code >= 400:
            raise RemoteRequestFailed(f"remote teacher HTTP {response.status_code}: {self._excerpt(response)}")
        try:
            answer: dict[str, Any] = response.json()
            return answer
        except ValueError:
            raise RemoteRequestFailed(f"remote teacher sent a body that is not JSON: {self._excerpt(response)}") \
                from None

    def _count_retry(self, state: RetryCallState) -> None:
        self.counters.add(http_retries=1)
        log.warning("remote teacher %s: attempt %d failed (%s); retrying", self.source.model, state.attempt_number,
                    state.outcome.exception() if state.outcome else "?")

    def _excerpt(self, response: httpx.Response) -> str:
        return self._scrub(response.text[:EXCERPT_CHARS])

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _sleep_unless_closed(self, seconds: float) -> None:
        # A worker that is stopping must not wait out a minute of backoff or budget first.
        if self.closed.wait(seconds):
            raise RemoteRequestFailed("remote teacher client closed (the worker is stopping)")

    def close(self) -> None:
        self.closed.set()
        self.http.close()


class RemoteEngine:
    """`workers.engine.Engine` over a `RemoteClient`: at most `max_concurrency` requests in flight."""

    def __init__(self, client: RemoteClient, tokenizer: Any, *, max_model_len: int, max_top_logprobs: int) -> None:
        self.client = client
        self.source = client.source
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_top_logprobs = max_top_logprobs
        self._pool = ThreadPoolExecutor(self.source.max_concurrency, thread_name_prefix="remote-teacher")
        self._futures: dict[str, Future[EngineResult]] = {}
        self._counters = client.counters
        self._counters.add(requests=0, prompt_tokens=0, completion_tokens=0)
        self._mapper: TokenMapper | None = None
        self._mapper_lock = threading.Lock()
        self._decode_lock = threading.Lock()  # Hugging Face fast tokenizers are not thread-safe mid-call

    # -- the Engine protocol -------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        if request.key in self._futures:
            raise ValueError(f"request key {request.key!r} is already in flight")
        self._futures[request.key] = self._pool.submit(self._run, request)

    def step(self) -> list[EngineResult]:
        if not self._futures:
            return []
        done, _ = wait(list(self._futures.values()), timeout=STEP_WAIT_S, return_when=FIRST_COMPLETED)
        finished = [key for key, future in self._futures.items() if future in done]
        return [self._futures.pop(key).result() for key in finished]

    def has_unfinished(self) -> bool:
        return bool(self._futures)

    def abort(self, keys: list[str]) -> None:
        # A request already on the wire cannot be taken back; its answer is dropped.
        for key in keys:
            future = self._futures.pop(key, None)
            if future is not None:
                future.cancel()

    def stats(self) -> dict[str, int]:
        """As the local adapter counts (finished requests, prompt tokens once per request, prompt +
        response in score mode, generated tokens), plus the HTTP traffic: requests sent, retries,
        429s, and milliseconds spent waiting on the budget."""
        return {**self._counters.snapshot(), "budget_wait_ms": int(self.client.budget.waited_s * 1000)}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # -- one request, on a pool thread --------------------------------------------

    def _run(self, request: EngineRequest) -> EngineResult:
        try:
            body, tokens = self._body(request)
            answer = self.client.complete(body, tokens)
            samples = self._samples(request, answer)
        except (RemoteRequestFailed, ValueError) as exc:
            return EngineResult(key=request.key, error=str(exc))
        except Exception as exc:  # a malformed answer: this request's failure, not the worker's
            log.exception("remote teacher: could not read the answer to %s", request.key)
            return EngineResult(key=request.key, error=f"remote teacher answer unreadable: {type(exc).__name__}: {exc}")
        self._count(request, samples)
        return EngineResult(key=request.key, samples=samples)

    def _body(self, request: EngineRequest) -> tuple[dict[str, Any], int]:
        """The request body, and the tokens it may spend (what the budget charges)."""
        if not 0 <= request.top_logprobs <= self.max_top_logprobs:
            raise ValueError(f"top_logprobs must be between 0 and {self.max_top_logprobs}")
        if self.source.api == "chat":
            return self._chat_body(request)
        if request.mode == "generate":
            return self._generate_body(request)
        if request.mode == "score":
            return self._score_body(request)
        raise ValueError(f"unknown mode {request.mode!r}")

    def _generate_body(self, request: EngineRequest) -> tuple[dict[str, Any], int]:
        spec: SamplingSpec = request.sampling
        prompt = list(request.prompt_token_ids)
        max_tokens = self._max_tokens(request)
        body = {"model": self.source.model, "prompt": prompt, **self._sampling(spec, max_tokens),
                "logprobs": request.top_logprobs}
        return body, len(prompt) + max_tokens * spec.n

    def _chat_body(self, request: EngineRequest) -> tuple[dict[str, Any], int]:
        """A chat endpoint gets the messages and applies its own chat template (the prompt's
        token ids here are the local template's rendering: the cache key and the rows' prompt)."""
        if request.mode != "generate" or not request.messages:
            raise ValueError("a teacher behind a chat endpoint takes generate requests given as messages")
        spec: SamplingSpec = request.sampling
        max_tokens = self._max_tokens(request)
        # vLLM's chat answer lists the sampled token among the first `top_logprobs` entries, so
        # the k-th best goes missing when the sampled token is not among them: ask for one more.
        asked = request.top_logprobs + 1 if self.source.vllm_extensions else request.top_logprobs
        body = {"model": self.source.model, "messages": request.messages, **self._sampling(spec, max_tokens),
                "logprobs": True, "top_logprobs": asked}
        return body, len(request.prompt_token_ids) + max_tokens * spec.n

    def _max_tokens(self, request: EngineRequest) -> int:
        room = self.max_model_len - len(request.prompt_token_ids)
        if room < 1:
            raise ValueError(f"the prompt ({len(request.prompt_token_ids)} tokens) leaves no room in the maximum "
                             f"model length of {self.max_model_len}")
        # The local engine stops at the context limit ("length"); a server rejects the request instead.
        return min(request.sampling.max_tokens, room)

    def _sampling(self, spec: SamplingSpec, max_tokens: int) -> dict[str, Any]:
        """The sampling fields, as the local adapter builds vLLM's SamplingParams."""
        values = {**spec.model_dump(), "max_tokens": max_tokens, "stop": list(spec.stop) or None,
                  "stop_token_ids": list(spec.stop_token_ids) or None}
        fields = {name: values[name] for name in openai_names()}
        if not self.source.vllm_extensions:
            _check_plain_openai(spec)
            return fields
        return fields | {name: values[name] for name in VLLM_ONLY_DEFAULTS} | {
            "include_stop_str_in_output": True, "return_tokens_as_token_ids": True, "return_token_ids": True,
        }

    def _score_body(self, request: EngineRequest) -> tuple[dict[str, Any], int]:
        if not self.source.vllm_extensions:
            raise ValueError("score mode needs prompt logprobs, which only vLLM's extensions offer")
        if not request.response_token_ids:
            raise ValueError("score mode needs at least one response token")
        if not request.prompt_token_ids:
            raise ValueError("score mode needs a non-empty prompt")
        sequence = list(request.prompt_token_ids) + list(request.response_token_ids)
        if len(sequence) + 1 > self.max_model_len:
            raise ValueError(f"prompt + response ({len(sequence)} tokens) leave no room in the maximum model "
                             f"length of {self.max_model_len}")
        # One greedy token is the least a server generates; it is discarded.
        body = {"model": self.source.model, "prompt": sequence, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": request.top_logprobs, "return_token_ids": True}
        return body, len(sequence) + 1

    # -- the answer ----------------------------------------------------------------

    def _samples(self, request: EngineRequest, answer: dict[str, Any]) -> list[Sample]:
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if request.mode == "score":
            if len(choices) != 1:
                raise RemoteRequestFailed(f"remote teacher answered {len(choices)} choices to a score request")
            return [self._scored_sample(request, choices[0])]
        if len(choices) != request.sampling.n:
            raise RemoteRequestFailed(f"remote teacher answered {len(choices)} choices, expected {request.sampling.n}")
        if self.source.api == "chat":
            return [self._chat_sample(request, choice) for choice in choices]
        return [self._generated_sample(request, choice) for choice in choices]

    def _generated_sample(self, request: EngineRequest, choice: dict[str, Any]) -> Sample:
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length", "repetition"):
            raise RemoteRequestFailed(f"remote teacher finished the request: {reason}")
        logprobs = choice.get("logprobs") or {}
        tokens, token_logprobs = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or []
        ids = choice.get("token_ids") or [self._token_id(t) for t in tokens]
        if not len(ids) == len(tokens) == len(token_logprobs) == len(tops):
            raise RemoteRequestFailed(f"remote teacher answered {len(ids)} tokens but {len(token_logprobs)} logprobs")
        positions = [self._top_k(top, token, request.top_logprobs) for top, token in zip(tops, ids)]
        return Sample(
            completion_token_ids=list(ids), completion_text=self._text(ids, choice.get("text", "")),
            token_logprobs=[_from_wire(lp) for lp in token_logprobs],
            top_token_ids=[[i for i, _ in p] for p in positions], top_logprobs=[[lp for _, lp in p] for p in positions],
            finish_reason="length" if reason == "length" else "stop", stop_reason=_stop_reason(choice),
        )

    def _chat_sample(self, request: EngineRequest, choice: dict[str, Any]) -> Sample:
        """OpenAI's chat shape: per token {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length", "repetition"):
            raise RemoteRequestFailed(f"remote teacher finished the request: {reason}")
        content = (choice.get("logprobs") or {}).get("content") or []
        ids = choice.get("token_ids") or [self._token_id(c["token"], c.get("bytes")) for c in content]
        if len(ids) != len(content):
            raise RemoteRequestFailed(f"remote teacher answered {len(ids)} tokens but {len(content)} logprobs")
        tops = []
        for position in content:
            entries = [(self._token_id(e["token"], e.get("bytes")), _from_wire(e["logprob"]))
                       for e in position.get("top_logprobs") or []]
            tops.append(sorted(entries, key=lambda e: -e[1])[:request.top_logprobs])  # stable: ties keep rank order
        text = (choice.get("message") or {}).get("content") or ""
        return Sample(
            completion_token_ids=list(ids), completion_text=self._text(ids, text),
            token_logprobs=[_from_wire(c["logprob"]) for c in content],
            top_token_ids=[[i for i, _ in p] for p in tops], top_logprobs=[[lp for _, lp in p] for p in tops],
            finish_reason="length" if reason == "length" else "stop", stop_reason=_stop_reason(choice),
        )

    def _top_k(self, top: dict[str, float] | None, token_id: int, k: int) -> list[tuple[int, float]]:
        """The top-k, best first, from one position's {token: logprob}. The server sends the
        sampled token too, so k + 1 entries mean it is outside the top-k: drop it."""
        entries = [(self._token_id(t), _from_wire(lp)) for t, lp in (top or {}).items()]
        if len(entries) > k:
            drop = next((n for n, (i, _) in enumerate(entries) if i == token_id), 0)
            entries.pop(drop)
        # Stable: ties keep the server's order, which is its rank order.
        return sorted(entries, key=lambda e: -e[1])[:k]

    def _scored_sample(self, request: EngineRequest, choice: dict[str, Any]) -> Sample:
        rows = choice.get("prompt_logprobs")
        prompt, response = list(request.prompt_token_ids), list(request.response_token_ids or [])
        if not rows or len(rows) != len(prompt) + len(response):
            raise RemoteRequestFailed("remote teacher returned no prompt logprobs for the scored sequence")
        token_logprobs, top_ids, top_logprobs = [], [], []
        for i, token in enumerate(response):
            # rows[j] is the distribution that predicted token j (row 0 is null).
            row = {int(t): entry for t, entry in (rows[len(prompt) + i] or {}).items()}
            if token not in row:
                raise RemoteRequestFailed(f"prompt logprob row {len(prompt) + i} lacks its token {token}")
            token_logprobs.append(_from_wire(row[token]["logprob"]))
            best = sorted(row.items(), key=lambda e: (e[1].get("rank") or math.inf, -e[1]["logprob"]))
            best = best[:request.top_logprobs]
            top_ids.append([t for t, _ in best])
            top_logprobs.append([_from_wire(e["logprob"]) for _, e in best])
        return Sample(completion_token_ids=response, completion_text=self._text(response, ""),
                      token_logprobs=token_logprobs, top_token_ids=top_ids, top_logprobs=top_logprobs,
                      finish_reason="scored")

    def _token_id(self, token: str, token_bytes: list[int] | None = None) -> int:
        parsed = parse_token_id(token)
        return parsed if parsed is not None else self._token_mapper().to_id(token, token_bytes)

    def _token_mapper(self) -> TokenMapper:
        with self._mapper_lock:  # built on first need: only servers without token ids need it
            if self._mapper is None:
                with self._decode_lock:
                    self._mapper = TokenMapper(self.tokenizer)
            return self._mapper

    def _text(self, ids: list[int], server_text: str) -> str:
        """The decoded tokens, as the local adapter writes them; the server's text when some
        token could not be mapped to an id."""
        if UNMAPPED in ids:
            return server_text
        with self._decode_lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _count(self, request: EngineRequest, samples: list[Sample]) -> None:
        prompt = len(request.prompt_token_ids) + len(request.response_token_ids or ())
        completion = sum(len(s.completion_token_ids) for s in samples) if request.mode == "generate" else 0
        self._counters.add(requests=1, prompt_tokens=prompt, completion_tokens=completion)


def _from_wire(logprob: float | None) -> float:
    if logprob is None or logprob <= OPENAI_FLOOR:
        return -math.inf
    return float(logprob)


def _check_plain_openai(spec: SamplingSpec) -> None:
    for name, default in VLLM_ONLY_DEFAULTS.items():
        if getattr(spec, name) != default:
            raise ValueError(f"sampling.{name} needs vLLM's extensions, which this remote teacher does not offer")


def _stop_reason(choice: dict[str, Any]) -> str | int | None:
    """vLLM's `stop_reason` (the stop string or token id); other servers send none or another type."""
    value = choice.get("stop_reason")
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None
