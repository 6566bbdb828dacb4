"""Service end-to-end generation throughput against plain `vllm.LLM.generate`, same run.

    .venv/bin/python -m bench.bench_pipeline [--requests 128] [--max-tokens 64] [--top-logprobs 20]

One engine is loaded once and used by both sides. The baseline is `LLM.generate` on the same
token-id prompts with the same SamplingParams (built by the adapter for the same requests).
The service side is the whole path: POST /v1/jobs (in-process ASGI), a worker loop on that
engine claiming from Postgres, result shards written and indexed, the job's shards assembled
and downloaded. Baseline runs before and after the service run; their mean is the reference.
Writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def prompts(teacher, count: int) -> list[list[int]]:
    """Distinct chat prompts built from the example file (numbered to keep them distinct)."""
    lines = [json.loads(x) for x in (Path(__file__).parent.parent / "examples/prompts.jsonl").read_text().splitlines()]
    texts = [line.get("prompt") or line["messages"][-1]["content"] for line in lines]
    return [teacher.encode_chat([{"role": "user", "content": f"{texts[i % len(texts)]} (#{i})"}]) for i in range(count)]


def engine_requests(token_prompts, args):
    from workers.engine import EngineRequest, SamplingSpec

    spec = SamplingSpec(max_tokens=args.max_tokens, temperature=1.0, seed=0, ignore_eos=args.ignore_eos)
    return [EngineRequest(key=str(i), prompt_token_ids=p, sampling=spec, top_logprobs=args.top_logprobs)
            for i, p in enumerate(token_prompts)]


def plain_params(request):
    """What a user of plain vLLM would write for the same request (vLLM's defaults otherwise)."""
    from vllm import SamplingParams

    spec = request.sampling
    return SamplingParams(n=spec.n, seed=spec.seed, temperature=spec.temperature, top_p=spec.top_p,
                          max_tokens=spec.max_tokens, ignore_eos=spec.ignore_eos, logprobs=request.top_logprobs)


def run_baseline(engine, requests) -> dict:
    """Plain LLM.generate over the same prompts and parameters."""
    started = time.perf_counter()
    outputs = engine.llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                                  [plain_params(r) for r in requests], use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def run_service(engine, token_prompts, args, rt) -> dict:
    """POST -> worker loop on the same engine -> shards assembled -> downloaded."""
    from bench.common import timed_service_job

    profile = args.profile / "service.txt" if args.profile else None
    body = {"top_logprobs": args.top_logprobs, "cache": "bypass",
            "sampling": {"max_tokens": args.max_tokens, "temperature": 1.0, "seed": 0, "ignore_eos": args.ignore_eos},
            "requests": [{"custom_id": str(i), "prompt_token_ids": p} for i, p in enumerate(token_prompts)]}
    return timed_service_job(rt, engine, body, args.flush_s, args.poll_s, profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens per request")
    parser.add_argument("--flush-s", type=float, default=3.0, help="the worker's result-shard flush interval")
    parser.add_argument("--poll-s", type=float, default=0.2, help="how often the waiting client polls the job")
    parser.add_argument("--rounds", type=int, default=1, help="before/service/after rounds on one engine; median ratio")
    parser.add_argument("--profile", type=Path, help="a folder for py-spy's samples of each run (raw format)")
    args = parser.parse_args()

    from bench.common import report_rounds, scratch_runtime, timed_baseline
    from service.settings import ServiceSettings
    from service.teachers.catalog import TeacherCatalog
    from workers.vllm_adapter import VllmEngine

    teacher = TeacherCatalog.from_settings(ServiceSettings()).get(None)
    engine = VllmEngine.load(str(teacher.folder), max_model_len=teacher.spec.max_model_len,
                             max_top_logprobs=teacher.spec.max_top_logprobs, dtype=teacher.spec.dtype,
                             keep_off_engine_cores=True)  # as a worker does (TEACHERCACHE_KEEP_OFF_ENGINE_CORES)
    token_prompts = prompts(teacher, args.requests)
    requests = engine_requests(token_prompts, args)
    run_baseline(engine, requests[:8])  # warm-up: the first batch after load is several times slower
    with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
        run_service(engine, token_prompts[:8], args, rt)  # the service's too (its first claim, shard, assembly)
    label = "LLM.generate (vLLM frontend, main thread)"
    rounds = []
    for _ in range(args.rounds):
        before = timed_baseline(lambda: run_baseline(engine, requests), label, args.profile and args.profile / "before.txt")
        with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
            service = run_service(engine, token_prompts, args, rt)
        after = timed_baseline(lambda: run_baseline(engine, requests), label, args.profile and args.profile / "after.txt")
        rounds.append((before, service, after))
    report_rounds(f"generation throughput, {args.requests} requests x {args.max_tokens} tokens, top-{args.top_logprobs}",
                  "LLM.generate", rounds, "pipeline.json", args)
    engine.close()


if __name__ == "__main__":
    main()
