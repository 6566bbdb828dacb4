"""Sampled soft labels from the real vLLM CPU engine, against transformers fp32 as the oracle.

The draws are made inside vLLM's engine step by the teachercache plugin (workers/vllm_draws.py,
entry point `vllm.general_plugins`); these tests check that what comes back is a sample of the
teacher's full raw distribution at the requested temperature:

- at fixed positions, 20,000 draws (200 requests of 100 draws, different draw seeds) pass a
  chi-square goodness-of-fit test against the oracle's softmax at p > 0.001, and the same test
  rejects the oracle at a temperature 10% off (so it can fail);
- across a job, counts / N per (position, token) agree with the oracle's probabilities within
  their binomial standard errors, and the completions are token for token those of the same
  requests without draws;
- the tail mass of the top-k (the ghost token) agrees with the oracle within 1e-5.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from teachercache.soft_labels import tail_logprob  # noqa: E402
from tests import engine_run  # noqa: E402
from tests.stats import chi_square_p  # noqa: E402
from workers import vllm_draws  # noqa: E402
from workers.engine import Draws, EngineRequest, EngineResult, SamplingSpec  # noqa: E402

pytestmark = pytest.mark.engine

K = 5
REPEATS, DRAWS = 200, 100  # 20,000 draws per fixed position
P_PASS = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _plugin_registered():
    if not vllm_draws.plugin_registered():
        pytest.fail(
            f"the vLLM plugin {vllm_draws.PLUGIN_NAME!r} is not registered in this environment: "
            "reinstall the project (pip install -e .) so its `vllm.general_plugins` entry point exists"
        )


@pytest.fixture(scope="module")
def hf_model(teacher_model_dir: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(teacher_model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(teacher_model_dir)


def run(engine, requests: list[EngineRequest]) -> dict[str, EngineResult]:
    return engine_run.run(engine, requests, max_steps=2000, no_errors=True)


def hf_rows(model, token_ids: list[int]) -> torch.Tensor:
    """Raw logits row j: the distribution that predicts token j + 1 (float64 for the tests)."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].double()


def pooled_draws(results: dict[str, EngineResult], position: int) -> Counter[int]:
    counts: Counter[int] = Counter()
    for result in results.values():
        sample = result.samples[0]
        assert sample.sample_token_ids is not None and sample.sample_counts is not None
        for token, count in zip(sample.sample_token_ids[position], sample.sample_counts[position], strict=True):
            counts[token] += count
    return counts


def assert_fits_only_the_right_temperature(counts: Counter[int], logits: torch.Tensor, temperature: float) -> None:
    p, df = chi_square_p(counts, torch.softmax(logits / temperature, dim=-1))
    assert p > P_PASS, f"draws do not fit the oracle at T={temperature}: p={p:.2e} (df={df})"
    for wrong in (temperature * 1.1, temperature / 1.1):
        p_wrong, _ = chi_square_p(counts, torch.softmax(logits / wrong, dim=-1))
        assert p_wrong < P_PASS, f"the test cannot tell T={temperature} from T={wrong}: p={p_wrong:.2e}"


# --- fixed positions: goodness of fit ----------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generated_position_draws_fit_the_oracle(vllm_engine, tokenizer, hf_model, temperature):
    prompt = tokenizer.encode("My favourite colour is")
    requests = [
        EngineRequest(
            key=f"fit-gen-{temperature}-{seed}", prompt_token_ids=prompt,
            sampling=SamplingSpec(max_tokens=1, temperature=1.0, seed=0), top_logprobs=K,
            draws=Draws(draws=DRAWS, temperature=temperature, seed=seed),
        )
        for seed in range(REPEATS)
    ]
    counts = pooled_draws(run(vllm_engine, requests), 0)
    assert sum(counts.values()) == REPEATS * DRAWS
    assert_fits_only_the_right_temperature(counts, hf_rows(hf_model, prompt)[-1], temperature)


def test_scored_position_draws_fit_the_oracle(vllm_engine, tokenizer, hf_model):
    prompt = tokenizer.encode("Once upon a time")
    response = tokenizer.encode(" there was a little")
    position = 2  # a response position with a broad distribution
    requests = [
        EngineRequest(
            key=f"fit-score-{seed}", prompt_token_ids=prompt, sampling=SamplingSpec(), top_logprobs=K,
            mode="score", response_token_ids=response, draws=Draws(draws=DRAWS, temperature=1.0, seed=seed),
        )
        for seed in range(REPEATS)
    ]
    counts = pooled_draws(run(vllm_engine, requests), position)
    logits = hf_rows(hf_model, prompt + response)[len(prompt) - 1 + position]
    assert_fits_only_the_right_temperature(counts, logits, 1.0)


# --- a job's worth of positions ----------------------------------------------------------

JOB_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about rain.",
               "Three reasons to learn Python:", "The weather today"]
JOB_DRAWS = 50


@pytest.fixture(scope="module")
def job(vllm_engine, tokenizer):
    """The same generate requests with and without draws (one batch, so both ran together)."""
    prompts = [tokenizer.encode(text) for text in JOB_PROMPTS]
    spec = SamplingSpec(max_tokens=24, temperature=1.0, seed=11, n=2)
    plain = [EngineRequest(key=f"job-plain-{i}", prompt_token_ids=p, sampling=spec, top_logprobs=20)
             for i, p in enumerate(prompts)]
    drawn = [EngineRequest(key=f"job-drawn-{i}", prompt_token_ids=p, sampling=spec, top_logprobs=20,
                           draws=Draws(draws=JOB_DRAWS, temperature=1.0, seed=5)) for i, p in enumerate(prompts)]
    return prompts, run(vllm_engine, plain + drawn)


def test_draws_never_change_the_completion(job):
    prompts, results = job
    for i in range(len(prompts)):
        plain, drawn = results[f"job-plain-{i}"].samples, results[f"job-drawn-{i}"].samples
        assert [s.completion_token_ids for s in plain] == [s.completion_token_ids for s in drawn]
        for a, b in zip(plain, drawn, strict=True):
            np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs)
            np.testing.assert_array_equal(a.top_token_ids, b.top_token_ids)
        assert all(s.sample_token_ids is None for s in plain)


def test_job_counts_agree_with_the_oracle(job, hf_model):
    prompts, results = job
    z_scores, total_p, total_freq, total_var = [], 0.0, 0.0, 0.0
    positions = 0
    for i, prompt in enumerate(prompts):
        for sample in results[f"job-drawn-{i}"].samples:
            assert sample.sample_token_ids is not None and sample.sample_counts is not None
            probs = torch.softmax(hf_rows(hf_model, prompt + sample.completion_token_ids), dim=-1)
            for t in range(len(sample.completion_token_ids)):
                row = probs[len(prompt) - 1 + t]
                ids, counts = sample.sample_token_ids[t], sample.sample_counts[t]
                assert sum(counts) == JOB_DRAWS and len(set(ids)) == len(ids)
                assert counts == sorted(counts, reverse=True)
                freq = dict(zip(ids, counts, strict=True))
                # A drawn token is one the teacher can produce at all.
                assert min(row[token].item() for token in ids) > 1e-9
                # The tokens compared are chosen by the oracle alone (choosing them by the draws
                # would bias the sums): every token it gives at least 1%.
                for token in torch.nonzero(row >= 0.01).flatten().tolist():
                    p = row[token].item()
                    f = freq.get(token, 0) / JOB_DRAWS
                    z_scores.append((f - p) / math.sqrt(p * (1 - p) / JOB_DRAWS))
                    total_p += p
                    total_freq += f
                    total_var += p * (1 - p) / JOB_DRAWS
                positions += 1
    assert positions > 100 and len(z_scores) > 200
    # Each (position, token) within its binomial standard error (5 SE: hundreds of tests).
    worst = max(abs(z) for z in z_scores)
    assert worst < 5, f"a frequency is {worst:.1f} standard errors from the oracle"
    # ... and as a whole, mean z^2 ~ 1 (far above: wrong distribution; far below: not random).
    mean_sq = sum(z * z for z in z_scores) / len(z_scores)
    assert 0.6 < mean_sq < 1.5, mean_sq
    # The summed frequencies over all of it, within a few summed standard errors.
    assert abs(total_freq - total_p) < 4 * math.sqrt(total_var) + 1e-9


def test_tail_mass_matches_the_oracle(job, hf_model):
    """1 - sum of the top-k probabilities, within 1e-5 of the oracle's beyond what the engine's
    own logprobs already differ from transformers' (different float32 kernels: each top-k
    probability is off by p * |delta logprob|, which the tail inherits; no tail computation
    can remove it)."""
    prompts, results = job
    worst_excess, worst_raw, positions = 0.0, 0.0, 0
    for i, prompt in enumerate(prompts):
        for sample in results[f"job-plain-{i}"].samples:
            logprobs = torch.log_softmax(hf_rows(hf_model, prompt + sample.completion_token_ids), dim=-1)
            for t, top in enumerate(sample.top_token_ids):
                row = logprobs[len(prompt) - 1 + t]
                oracle_tail = 1.0 - row[top].exp().sum().item()
                got = math.exp(tail_logprob(sample.top_logprobs[t]))
                inherited = sum(math.exp(lp) * abs(math.expm1(row[tok].item() - lp))
                                for tok, lp in zip(top, sample.top_logprobs[t], strict=True))
                worst_raw = max(worst_raw, abs(got - oracle_tail))
                worst_excess = max(worst_excess, abs(got - oracle_tail) - inherited)
                positions += 1
    print(f"\ntail mass vs transformers over {positions} positions: max |diff| {worst_raw:.2e}, "
          f"beyond the engine's own logprob differences {worst_excess:.2e}")
    assert positions > 100
    assert worst_excess < 1e-5, worst_excess


# --- reproducibility and independence ------------------------------------------------------


def test_same_request_same_draws_whatever_its_batch(vllm_engine, tokenizer, job):
    prompts, results = job
    spec = SamplingSpec(max_tokens=24, temperature=1.0, seed=11, n=2)
    alone = run(vllm_engine, [EngineRequest(key="alone", prompt_token_ids=prompts[0], sampling=spec,
                                            top_logprobs=20, draws=Draws(draws=JOB_DRAWS, temperature=1.0, seed=5))])["alone"]
    batched = results["job-drawn-0"]
    assert [s.sample_token_ids for s in alone.samples] == [s.sample_token_ids for s in batched.samples]
    assert [s.sample_counts for s in alone.samples] == [s.sample_counts for s in batched.samples]
    other_seed = run(vllm_engine, [EngineRequest(key="seed6", prompt_token_ids=prompts[0], sampling=spec,
                                                 top_logprobs=20, draws=Draws(draws=JOB_DRAWS, temperature=1.0, seed=6))])["seed6"]
    assert other_seed.samples[0].completion_token_ids == batched.samples[0].completion_token_ids
    assert other_seed.samples[0].sample_counts != batched.samples[0].sample_counts


def test_score_mode_draws_beside_top_k(vllm_engine, tokenizer):
    prompt, response = tokenizer.encode("Hello"), tokenizer.encode(" world, how are you?")
    plain = EngineRequest(key="s-plain", prompt_token_ids=prompt, sampling=SamplingSpec(), top_logprobs=K,
                          mode="score", response_token_ids=response)
    drawn = EngineRequest(key="s-drawn", prompt_token_ids=prompt, sampling=SamplingSpec(), top_logprobs=K,
                          mode="score", response_token_ids=response, draws=Draws(draws=30, temperature=1.0, seed=0))
    results = run(vllm_engine, [plain, drawn])
    a, b = results["s-plain"].samples[0], results["s-drawn"].samples[0]
    np.testing.assert_array_equal(a.top_token_ids, b.top_token_ids)
    np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs)
    assert b.sample_counts is not None and len(b.sample_counts) == len(response)
    assert all(sum(c) == 30 for c in b.sample_counts)


# --- the hook's pin --------------------------------------------------------------------------


def test_hooked_vllm_code_is_the_pinned_code():
    """Fails loudly when a vLLM upgrade changes any function the hook relies on: re-read them
    (workers/vllm_draws.py says what it relies on) and re-pin HOOKED_SOURCES."""
    vllm_draws.check_hooked_sources()
    assert set(vllm_draws.hooked_source_hashes()) == set(vllm_draws.HOOKED_SOURCES)


def test_the_pin_check_can_fail(monkeypatch):
    moved = dict(vllm_draws.HOOKED_SOURCES)
    moved["vllm.v1.sample.sampler.Sampler.gather_logprobs"] = "0" * 64
    monkeypatch.setattr(vllm_draws, "HOOKED_SOURCES", moved)
    with pytest.raises(RuntimeError, match="gather_logprobs"):
        vllm_draws.check_hooked_sources()


def test_an_engine_without_the_plugin_refuses_draws(vllm_engine, tokenizer, monkeypatch):
    monkeypatch.setattr(vllm_engine, "can_draw", False)
    request = EngineRequest(key="no-plugin", prompt_token_ids=tokenizer.encode("Hi"),
                            sampling=SamplingSpec(max_tokens=2), top_logprobs=K, draws=Draws(draws=10, temperature=1.0, seed=0))
    vllm_engine.add(request)
    (result,) = vllm_engine.step()
    assert result.error is not None and vllm_draws.PLUGIN_NAME in result.error


# --- what crosses from the engine: unique ids and counts only ------------------------------


def test_the_engine_sends_only_unique_ids_and_their_counts(vllm_engine, tokenizer, monkeypatch):
    """The raw entries vLLM hands the adapter per position, after the token and its top-k: the
    unique drawn ids with counts summing to the draws, then only padding (id 0, count 0) up to
    the widest row of that step's batch (generated) or of the request's positions (scored),
    never the N columns the request reserved."""
    from workers.vllm_adapter import VllmEngine

    seen: dict[str, list[tuple[list[int], list[float]]]] = {}
    original = VllmEngine._sample

    def recording(self, token_ids, positions, reason, request):
        seen[request.key] = [(p.top_ids[K:], p.top_logprobs[K:]) for p in positions]
        return original(self, token_ids, positions, reason, request)

    monkeypatch.setattr(VllmEngine, "_sample", recording)
    draws = Draws(draws=JOB_DRAWS, temperature=1.0, seed=3)
    prompts = [tokenizer.encode(text) for text in JOB_PROMPTS]
    generated = [EngineRequest(key=f"raw-gen-{i}", prompt_token_ids=p, sampling=SamplingSpec(max_tokens=16, seed=2),
                               top_logprobs=K, draws=draws) for i, p in enumerate(prompts)]
    scored = [EngineRequest(key=f"raw-score-{i}", prompt_token_ids=p[:3], sampling=SamplingSpec(), top_logprobs=K,
                            mode="score", response_token_ids=p[3:] + p, draws=draws) for i, p in enumerate(prompts)]
    run(vllm_engine, generated + scored)
    assert set(seen) == {r.key for r in generated + scored}
    widths, uniques = [], []
    for positions in seen.values():
        request_widths = []
        assert positions
        for ids, counts in positions:
            used = [c for c in counts if c > 0]
            assert counts[: len(used)] == used and all(c == 0 for c in counts[len(used):])
            assert all(i == 0 for i in ids[len(used):])
            assert sum(used) == JOB_DRAWS and all(c == int(c) for c in used)
            assert len(set(ids[: len(used)])) == len(used)
            request_widths.append(len(ids))
            uniques.append(len(used))
        widths.extend(request_widths)
    assert max(widths) == max(uniques) < JOB_DRAWS  # as wide as the most unique ids, never N
    # A scored request's positions go out together, as wide as its own most unique ids.
    for key, positions in ((r.key, seen[r.key]) for r in scored):
        assert len({len(ids) for ids, _ in positions}) == 1, key
        # (at least its response positions' most: the prompt's own positions count too)
        assert len(positions[0][0]) >= max(sum(1 for c in counts if c > 0) for _, counts in positions)
    print(f"\nentries per position after the token and top-{K}: mean {sum(widths) / len(widths):.1f}, "
          f"max {max(widths)} (unique draws: mean {sum(uniques) / len(uniques):.1f}); reserved {JOB_DRAWS}")


def test_the_engine_runs_the_runner_the_hook_covers(vllm_engine, monkeypatch):
    """The hook covers vLLM's V1 model runner; an engine configured for V2 (the default on a GPU
    with Triton, unless VllmEngine.load asked for V1) is one that cannot draw."""
    assert vllm_draws.runs_hooked_runner(vllm_engine._engine.vllm_config)
    monkeypatch.setenv(vllm_draws.V2_RUNNER_ENV, "1")
    assert not vllm_draws.runs_hooked_runner(vllm_engine._engine.vllm_config)
