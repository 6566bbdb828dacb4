"""One conformance suite for every engine behind workers/engine.py's protocol (as pgqueuer tests
each port adapter): the scripted stand-in, the real vLLM engine (the session's, marked `engine`)
and the remote adapter against tests/remote_stub.py. The loop relies on exactly this."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from service.teachers.registry import RemoteSource
from tests.remote_stub import StubTeacher
from workers.engine import Engine, EngineRequest, EngineResult, SamplingSpec
from workers.main import ENGINES
from workers.scripted_engine import ScriptedEngine

FAIL_TOKEN = 7  # the scripted engine fails a prompt holding it, as a real one fails a prompt too long
MAX_MODEL_LEN = 2048


@dataclass
class EngineUnderTest:
    engine: Engine
    doomed_prompt: list[int]  # a prompt this engine refuses as that request's error alone
    scores: bool = True


def run_to_end(engine: Engine, timeout_steps: int = 100_000) -> dict[str, EngineResult]:
    results: dict[str, EngineResult] = {}
    for _ in range(timeout_steps):
        if not engine.has_unfinished():
            return results
        for result in engine.step():
            assert result.key not in results, f"{result.key} came back twice"
            results[result.key] = result
    raise AssertionError("the engine never finished")


def generate(key: str, prompt: list[int], max_tokens: int = 6, n: int = 2, top: int = 3) -> EngineRequest:
    return EngineRequest(key=key, prompt_token_ids=prompt, sampling=SamplingSpec(max_tokens=max_tokens, n=n, seed=1),
                         top_logprobs=top)


@pytest.fixture(params=["scripted", pytest.param("vllm", marks=pytest.mark.engine), "remote"])
def under_test(request, teacher_model_dir) -> Iterator[EngineUnderTest]:
    kind = request.param
    if kind == "vllm":
        yield EngineUnderTest(request.getfixturevalue("vllm_engine"), doomed_prompt=[1] * (MAX_MODEL_LEN + 1))
        return  # the session's engine: closed once, at the end of the session
    if kind == "scripted":
        engine: Engine = ScriptedEngine(fail_tokens=frozenset({FAIL_TOKEN}))
        doomed = [1, FAIL_TOKEN]
        yield EngineUnderTest(engine, doomed_prompt=doomed)
    else:
        from transformers import AutoTokenizer

        from workers.remote_adapter import RemoteClient, RemoteEngine

        stub = StubTeacher()
        source = RemoteSource(base_url=stub.base_url, model="stub", max_retries=0)
        engine = RemoteEngine(RemoteClient(source, None), AutoTokenizer.from_pretrained(teacher_model_dir),
                              max_model_len=MAX_MODEL_LEN, max_top_logprobs=20)
        # The stub answers no prompt logprobs (score mode is test_remote_vllm.py's, on a real vLLM server).
        yield EngineUnderTest(engine, doomed_prompt=[1] * (MAX_MODEL_LEN + 1), scores=False)
        stub.close()
    engine.close()


def test_every_kind_in_the_registry_is_under_test():
    assert set(ENGINES) == {"scripted", "vllm", "remote"}


def test_generate_returns_each_request_once_with_n_aligned_samples(under_test):
    engine = under_test.engine
    before = engine.stats()
    for i in range(3):
        engine.add(generate(f"g{i}", [1, 2, 3 + i]))
    results = run_to_end(engine)
    assert sorted(results) == ["g0", "g1", "g2"]
    for result in results.values():
        assert result.error is None and len(result.samples) == 2
        for sample in result.samples:
            positions = len(sample.completion_token_ids)
            assert 1 <= positions <= 6 and sample.finish_reason in ("stop", "length")
            assert len(sample.token_logprobs) == len(sample.top_token_ids) == len(sample.top_logprobs) == positions
            assert all(len(ids) == len(logps) == 3 for ids, logps in zip(sample.top_token_ids, sample.top_logprobs))
            assert all(logp <= 0 for logp in sample.token_logprobs)
    after = engine.stats()
    assert after["requests"] - before["requests"] == 3
    assert after["completion_tokens"] - before["completion_tokens"] == sum(
        len(s.completion_token_ids) for r in results.values() for s in r.samples)


def test_a_request_the_engine_refuses_fails_alone(under_test):
    engine = under_test.engine
    engine.add(generate("bad", under_test.doomed_prompt, n=1))
    engine.add(generate("good", [1, 2, 3], n=1))
    results = run_to_end(engine)
    assert results["bad"].error and not results["bad"].samples
    assert results["good"].error is None and len(results["good"].samples) == 1


def test_an_aborted_request_never_comes_back(under_test):
    engine = under_test.engine
    engine.add(generate("kept", [4, 5, 6], n=1))
    engine.add(generate("aborted", [4, 5, 8], max_tokens=64, n=1))
    engine.abort(["aborted"])
    results = run_to_end(engine)
    assert set(results) == {"kept"}
    assert not engine.has_unfinished()


def test_score_mode_records_exactly_the_response_tokens(under_test):
    if not under_test.scores:
        pytest.skip("this engine's stand-in server answers no prompt logprobs")
    engine = under_test.engine
    response = [10, 11, 12, 13]
    engine.add(EngineRequest(key="s", prompt_token_ids=[1, 2, 3], sampling=SamplingSpec(), top_logprobs=2,
                             mode="score", response_token_ids=response))
    (sample,) = run_to_end(engine)["s"].samples
    assert sample.completion_token_ids == response and sample.finish_reason == "scored"
    assert len(sample.token_logprobs) == len(sample.top_token_ids) == len(response)


def test_it_implements_the_whole_protocol(under_test):
    """close() included: the worker calls every method without asking whether it is there."""
    assert isinstance(under_test.engine, Engine)
