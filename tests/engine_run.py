"""Driving an `workers.engine.Engine` to idle in tests: the one helper the engine tests share."""

from __future__ import annotations

from workers.engine import Engine, EngineRequest, EngineResult


def run(
    engine: Engine,
    requests: list[EngineRequest],
    *,
    max_steps: int = 500,
    once_per_key: bool = True,
    no_errors: bool = False,
) -> dict[str, EngineResult]:
    """Add all requests, step until the engine is idle (at most `max_steps` steps), return the
    results by key. `once_per_key`: a key that finishes twice fails the test; `no_errors`: so
    does any result with an error (tests that only look at successful outputs)."""
    for request in requests:
        engine.add(request)
    results: dict[str, EngineResult] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for result in engine.step():
            assert not (once_per_key and result.key in results), f"{result.key} finished twice"
            results[result.key] = result
    assert not engine.has_unfinished(), f"engine did not finish in {max_steps} steps"
    if no_errors:
        for key, result in results.items():
            assert result.error is None, (key, result.error)
    return results
