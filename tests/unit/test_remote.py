"""The remote teacher's parts on their own: the budget (fake clock), the retry policy, the
token-string mapping, and reading answers (against the loopback stub, no database)."""

from __future__ import annotations

import math

import httpx
import pytest
from transformers import AutoTokenizer

from service.settings import PROJECT_ROOT
from service.teachers.registry import RemoteSource, TeacherSpec, load_registry
from teachercache.errors import parse_retry_after as retry_after_seconds
from tests.remote_stub import StubTeacher
from workers.engine import EngineRequest, SamplingSpec
from workers.remote_adapter import RemoteClient, RemoteEngine, RemoteRequestFailed
from workers.remote_budget import Budget, TokenBucket
from workers.remote_tokens import UNMAPPED, TokenMapper

MODEL_DIR = PROJECT_ROOT / "models" / "smollm2-135m-instruct"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


# --- budget -----------------------------------------------------------------------------


def test_requests_per_minute_allow_a_one_second_burst_then_the_rate():
    clock = FakeClock()
    budget = Budget(requests_per_minute=120, clock=clock, sleep=clock.sleep)  # 2/s, bucket of 2
    sent_at = []
    for _ in range(10):
        budget.acquire(1)
        sent_at.append(clock.now)
    assert sent_at[:2] == [0.0, 0.0]
    assert sent_at[2:] == pytest.approx([0.5 * i for i in range(1, 9)])
    for i in range(len(sent_at)):  # any window of t seconds holds at most 2 + 2 t requests
        for j in range(i, len(sent_at)):
            assert j - i + 1 <= 2 + 2 * (sent_at[j] - sent_at[i]) + 1e-9


def test_tokens_per_minute_charge_what_a_request_may_spend_and_carry_debt():
    clock = FakeClock()
    budget = Budget(tokens_per_minute=6000, clock=clock, sleep=clock.sleep)  # 100 tokens/s, bucket of 100
    budget.acquire(100)
    assert clock.now == 0.0
    budget.acquire(300)  # bigger than the bucket: waits for a full bucket, then owes 200
    assert clock.now == pytest.approx(1.0)
    budget.acquire(50)  # the debt is paid first: 200 + 50 tokens at 100/s
    assert clock.now == pytest.approx(3.5)
    assert budget.waited_s == pytest.approx(3.5)


def test_a_429_pause_holds_every_request_back():
    clock = FakeClock()
    budget = Budget(requests_per_minute=6000, clock=clock, sleep=clock.sleep)
    budget.acquire(1)
    budget.pause(3.0)
    budget.acquire(1)
    assert clock.now == pytest.approx(3.0)


def test_a_bucket_refills_continuously_up_to_its_capacity():
    clock = FakeClock()
    bucket = TokenBucket(60, clock=clock)  # 1/s, capacity 1
    bucket.take(1)
    assert bucket.wait_for(1) == pytest.approx(1.0)
    clock.now = 0.25
    assert bucket.wait_for(1) == pytest.approx(0.75)
    clock.now = 100
    assert bucket.wait_for(1) == 0 and bucket.level == 1


# --- retry policy -----------------------------------------------------------------------


def source(base_url: str = "http://127.0.0.1:9/v1", **fields) -> RemoteSource:
    return RemoteSource(**{"base_url": base_url, "model": "m", "max_retries": 3, "backoff_initial_s": 0.5,
                           "backoff_max_s": 4.0, **fields})


def scripted_transport(answers: list[httpx.Response | Exception], seen: list[httpx.Request]):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler)


def test_retry_after_is_honoured_then_backoff_grows_with_jitter_then_the_last_status_is_reported():
    clock, seen = FakeClock(), []
    answers = [httpx.Response(429, headers={"Retry-After": "7"}, text="slow down"),
               httpx.ConnectError("refused"), httpx.Response(503, text="busy"),
               httpx.Response(502, text="bad gateway " + "x" * 1000)]
    client = RemoteClient(source(), "sk-test", sleep=clock.sleep, transport=scripted_transport(answers, seen),
                          budget=Budget(clock=clock, sleep=clock.sleep))
    with pytest.raises(RemoteRequestFailed) as failed:
        client.complete({"prompt": [1]}, tokens=1)
    message = str(failed.value)
    assert message.startswith("remote teacher HTTP 502: bad gateway") and len(message) < 400
    assert len(seen) == 4  # 1 + max_retries
    retry_after, *backoffs = clock.slept
    assert retry_after == 7
    # wait_exponential_jitter: initial * 2^(n-1) plus up to `initial` of jitter, capped at the max.
    assert 1.0 <= backoffs[0] <= 1.5 and 2.0 <= backoffs[1] <= 2.5
    assert client.counters.snapshot() == {"http_requests": 4, "http_rate_limited": 1, "http_retries": 3}
    assert seen[0].headers["authorization"] == "Bearer sk-test"


def test_a_client_error_is_not_retried():
    clock, seen = FakeClock(), []
    client = RemoteClient(source(), None, sleep=clock.sleep,
                          transport=scripted_transport([httpx.Response(400, text="bad prompt")], seen))
    with pytest.raises(RemoteRequestFailed, match="remote teacher HTTP 400: bad prompt"):
        client.complete({}, tokens=1)
    assert len(seen) == 1 and clock.slept == [] and "authorization" not in seen[0].headers


def test_connection_errors_that_persist_are_reported_as_such():
    clock = FakeClock()
    client = RemoteClient(source(max_retries=1), None, sleep=clock.sleep,
                          transport=scripted_transport([httpx.ConnectError("refused")] * 2, []))
    with pytest.raises(RemoteRequestFailed, match="remote teacher connection error: ConnectError: refused"):
        client.complete({}, tokens=1)


def test_error_excerpts_never_carry_the_api_key():
    client = RemoteClient(source(max_retries=0), "sk-very-secret", transport=scripted_transport(
        [httpx.Response(500, text="you sent Bearer sk-very-secret")], []))
    with pytest.raises(RemoteRequestFailed) as failed:
        client.complete({}, tokens=1)
    assert "sk-very-secret" not in str(failed.value) and "Bearer ***" in str(failed.value)


def test_retry_after_as_seconds_or_http_date():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=lambda: 1445412485.0) == 5.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


# --- token strings -> ids -----------------------------------------------------------------


def test_token_strings_map_back_to_ids_and_ambiguous_ones_are_flagged(tokenizer):
    mapper = TokenMapper(tokenizer)
    ids = tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    assert [mapper.to_id(tokenizer.decode([i])) for i in ids] == ids
    assert mapper.to_id("token_id:4093") == 4093  # vLLM's exact spelling
    assert mapper.to_id("Ġthe") == tokenizer.convert_tokens_to_ids("Ġthe")  # the vocabulary's own spelling
    # Byte fragments of a multi-byte character all decode to U+FFFD: no way to tell them apart.
    assert mapper.to_id("\ufffd") == UNMAPPED
    assert mapper.to_id("no such token in any vocabulary") == UNMAPPED


def test_an_answer_in_token_strings_is_mapped_and_unmappable_positions_are_flagged(tokenizer):
    """A plain OpenAI-compatible server: no token ids anywhere, only decoded strings."""
    hello, world = tokenizer.encode("Hello world", add_special_tokens=False)
    answer = {"choices": [{"index": 0, "text": "Hello world\ufffd", "finish_reason": "length", "logprobs": {
        "tokens": ["Hello", " world", "\ufffd"], "token_logprobs": [-0.1, -0.2, -9999.0],
        "top_logprobs": [{"Hello": -0.1, " world": -3.0}, {" world": -0.2, "\ufffd": -2.5},
                         {"\ufffd": -9999.0, "Hello": -1.0, " world": -2.0}]}}]}
    engine = RemoteEngine(RemoteClient(source(vllm_extensions=False), None), tokenizer, max_model_len=2048,
                          max_top_logprobs=20)
    request = EngineRequest(key="k", prompt_token_ids=[1], sampling=SamplingSpec(max_tokens=3), top_logprobs=2)
    [sample] = engine._samples(request, answer)
    assert sample.completion_token_ids == [hello, world, UNMAPPED]
    assert sample.top_token_ids == [[hello, world], [world, UNMAPPED], [hello, world]]
    assert sample.token_logprobs[:2] == [-0.1, -0.2] and sample.token_logprobs[2] == -math.inf
    assert sample.top_logprobs[1] == [-0.2, -2.5]
    assert sample.completion_text == "Hello world\ufffd"  # the server's text where ids are missing


def test_the_sampled_token_outside_the_top_k_is_dropped_from_it(tokenizer):
    engine = RemoteEngine(RemoteClient(source(), None), tokenizer, max_model_len=2048, max_top_logprobs=20)
    # vLLM sends the sampled token first, then the top-k in rank order (ties keep that order).
    top = {"token_id:9": -5.0, "token_id:1": -0.5, "token_id:2": -1.0, "token_id:3": -1.0}
    assert engine._top_k(top, 9, 3) == [(1, -0.5), (2, -1.0), (3, -1.0)]
    inside = {"token_id:2": -1.0, "token_id:1": -0.5, "token_id:3": -1.5}
    assert engine._top_k(inside, 2, 3) == [(1, -0.5), (2, -1.0), (3, -1.5)]
    assert engine._top_k({"token_id:9": -5.0}, 9, 0) == []


# --- requests the adapter refuses before sending ----------------------------------------


def test_requests_a_plain_openai_server_cannot_honour_fail_alone_without_a_request(tokenizer):
    stub = StubTeacher()
    try:
        engine = RemoteEngine(RemoteClient(source(stub.base_url, vllm_extensions=False), None), tokenizer,
                              max_model_len=64, max_top_logprobs=20)
        bad = [EngineRequest(key="top-k", prompt_token_ids=[1], sampling=SamplingSpec(top_k=5), top_logprobs=1),
               EngineRequest(key="score", prompt_token_ids=[1], sampling=SamplingSpec(), top_logprobs=1,
                             mode="score", response_token_ids=[2]),
               EngineRequest(key="too-long", prompt_token_ids=[1] * 64, sampling=SamplingSpec(), top_logprobs=1),
               EngineRequest(key="k", prompt_token_ids=[1], sampling=SamplingSpec(), top_logprobs=21)]
        good = EngineRequest(key="ok", prompt_token_ids=[1] * 60, sampling=SamplingSpec(max_tokens=10, n=2),
                             top_logprobs=3)
        for request in [*bad, good]:
            engine.add(request)
        results = {}
        while engine.has_unfinished():
            results.update({r.key: r for r in engine.step()})
        assert all(results[r.key].error for r in bad)
        assert "needs vLLM's extensions" in results["top-k"].error
        assert results["ok"].error is None and len(results["ok"].samples) == 2
        # The context limit caps max_tokens (the local engine stops there with "length").
        assert [s["body"]["max_tokens"] for s in map(vars, stub.seen)] == [4]
        assert all(len(s.completion_token_ids) == 4 and len(s.top_token_ids[0]) == 3 for s in results["ok"].samples)
        assert engine.stats()["requests"] == 1 and engine.stats()["http_requests"] == 1
        engine.close()
    finally:
        stub.close()


# --- registry -----------------------------------------------------------------------------


def test_registry_reads_a_remote_teacher(tmp_path):
    path = tmp_path / "teachers.yaml"
    path.write_text(
        "teachers:\n"
        "  - name: hosted\n"
        "    revision: '2025-01-01'\n"
        "    tokenizer: smollm2-135m-instruct\n"
        "    source: {kind: remote, base_url: 'https://api.example/v1', model: big, api_key_env: HOSTED_KEY,\n"
        "             max_concurrency: 4, requests_per_minute: 600, tokens_per_minute: 100000,\n"
        "             price_per_million_prompt_tokens: 0.5, price_per_million_completion_tokens: 1.5}\n")
    spec = load_registry(path).get("hosted")
    assert spec.is_remote and spec.remote.model == "big" and spec.remote.api_key_env == "HOSTED_KEY"
    assert spec.model_dir(PROJECT_ROOT / "models") == PROJECT_ROOT / "models" / "smollm2-135m-instruct"
    assert spec.prices() == (0.5, 1.5)
    assert load_registry(path).get("smollm2-135m-instruct").prices() == (None, None)


@pytest.mark.parametrize("missing", ["revision", "tokenizer"])
def test_a_remote_teacher_must_declare_its_revision_and_tokenizer(missing):
    entry = {"name": "r", "revision": "1", "tokenizer": "t",
             "source": {"kind": "remote", "base_url": "http://x/v1", "model": "m"}}
    del entry[missing]
    with pytest.raises(ValueError, match=missing):
        TeacherSpec(**entry)


def test_closing_the_client_cuts_a_long_backoff_short():
    """A stopping worker must not wait out a server's Retry-After of a minute first."""
    import threading
    import time

    client = RemoteClient(source(), None, transport=scripted_transport(
        [httpx.Response(429, headers={"Retry-After": "60"}, text="later")], []))
    threading.Timer(0.3, client.close).start()
    started = time.monotonic()
    with pytest.raises(RemoteRequestFailed, match="closed"):
        client.complete({}, tokens=1)
    assert time.monotonic() - started < 5
