"""When and how long the client retries: transient failures only, with jittered backoff."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tenacity

from teachercache.errors import RateLimitError, ServerError, TransportError

# Gateways and overloaded services answer these while the request may well succeed later;
# a plain 500 is a bug on the server, and repeating the request will not fix it.
RETRYABLE_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How the client retries transient failures (network errors, 429, 502/503/504).

    Waits are "full jitter" exponential backoff (a random time up to
    ``initial_backoff * 2**attempt``, capped at ``max_backoff``), except that a
    ``Retry-After`` header is obeyed (capped at ``max_retry_after``).
    ``sleep`` replaces ``time.sleep`` / ``asyncio.sleep``, e.g. to record waits in tests.
    """

    max_attempts: int = 6
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    sleep: Callable[[float], Any] | None = None


def is_transient(error: BaseException) -> bool:
    """Whether repeating the same request may succeed."""
    if isinstance(error, (TransportError, RateLimitError)):
        return True
    return isinstance(error, ServerError) and error.status_code in RETRYABLE_STATUSES


def _wait_strategy(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    backoff = tenacity.wait_random_exponential(multiplier=policy.initial_backoff, max=policy.max_backoff)

    def wait(state: tenacity.RetryCallState) -> float:
        retry_after = getattr(state.outcome.exception(), "retry_after", None) if state.outcome else None
        if retry_after is not None:
            return min(float(retry_after), policy.max_retry_after)
        return backoff(state)

    return wait


def _common_options(policy: RetryPolicy) -> dict[str, Any]:
    return {
        "stop": tenacity.stop_after_attempt(policy.max_attempts),
        "wait": _wait_strategy(policy),
        "retry": tenacity.retry_if_exception(is_transient),
        # Callers catch our own exception types, never tenacity.RetryError.
        "reraise": True,
    }


def retrying(policy: RetryPolicy) -> tenacity.Retrying:
    """A tenacity loop for blocking calls: ``for attempt in retrying(p): with attempt: ...``."""
    return tenacity.Retrying(sleep=policy.sleep or time.sleep, **_common_options(policy))


def async_retrying(policy: RetryPolicy) -> tenacity.AsyncRetrying:
    """The same policy for coroutines: ``async for attempt in async_retrying(p): ...``."""
    return tenacity.AsyncRetrying(sleep=_async_sleep(policy.sleep), **_common_options(policy))


def _async_sleep(sleep: Callable[[float], Any] | None) -> Callable[[float], Any]:
    if sleep is None:
        return asyncio.sleep

    async def injected_sleep(seconds: float) -> None:
        result = sleep(seconds)
        if inspect.isawaitable(result):
            await result

    return injected_sleep
