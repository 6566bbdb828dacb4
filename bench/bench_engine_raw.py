"""Raw engine throughput: VllmEngine alone, no database, no storage, no HTTP.

Generates completions for synthetic prompts, then scores those completions
(teacher-forced), and prints one JSON line per phase with tokens/s, so the cost of the
adapter and of recording top-k logprobs can be compared with the service end to end.

    VLLM_CPU_KVCACHE_SPACE=2 PYTHONPATH=. python bench/bench_engine_raw.py \
        --model-dir /tmp/venvtest/model --requests 32 --max-tokens 64 --top-logprobs 20
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from workers.engine import EngineRequest, EngineResult, SamplingSpec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/venvtest/model")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--top-logprobs", type=int, default=20)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    return p.parse_args(argv)


def synthetic_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    # Real text tokens (not random ids) so the teacher behaves as on data.
    words = "the a model learns from teacher signals while data flows in batches".split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        ids = tokenizer.encode(" ".join(rng.choice(words) for _ in range(length)))
        prompts.append(ids[:length])
    return prompts


def drain(engine, requests: list[EngineRequest]) -> tuple[dict[str, EngineResult], float, int]:
    """Feed everything, step until idle; returns results, wall seconds and steps."""
    start = time.perf_counter()
    for request in requests:
        engine.add(request)
    results: dict[str, EngineResult] = {}
    steps = 0
    while engine.has_unfinished():
        results.update((r.key, r) for r in engine.step())
        steps += 1
    return results, time.perf_counter() - start, steps


def phase_report(name: str, engine, before: dict, results, wall: float, steps: int) -> dict:
    after = engine.stats()
    delta = {k: after[k] - before[k] for k in after}
    errors = sum(1 for r in results.values() if r.error)
    positions = sum(len(s.token_logprobs) for r in results.values() for s in r.samples)
    return {
        "phase": name,
        "requests": len(results),
        "errors": errors,
        "steps": steps,
        "wall_s": round(wall, 3),
        "recorded_positions": positions,
        "positions_per_s": round(positions / wall, 1),
        "prompt_tokens_per_s": round(delta["prompt_tokens"] / wall, 1),
        **delta,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from workers.vllm_adapter import VllmEngine  # slow import: after argument errors

    t0 = time.perf_counter()
    engine = VllmEngine.load(
        args.model_dir,
        max_model_len=args.max_model_len,
        max_top_logprobs=args.top_logprobs,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
    )
    reports = [{"phase": "load", "wall_s": round(time.perf_counter() - t0, 1)}]
    prompts = synthetic_prompts(engine.tokenizer, args.requests, args.prompt_tokens)
    spec = SamplingSpec(max_tokens=args.max_tokens, n=args.n, ignore_eos=True)
    gen = [EngineRequest(f"g{i}", p, spec, args.top_logprobs) for i, p in enumerate(prompts)]
    before = engine.stats()
    results, wall, steps = drain(engine, gen)
    reports.append(phase_report("generate", engine, before, results, wall, steps))

    scores = [
        EngineRequest(f"s{i}", p, SamplingSpec(), args.top_logprobs, mode="score",
                      response_token_ids=results[f"g{i}"].samples[0].completion_token_ids)
        for i, p in enumerate(prompts)
    ]
    before = engine.stats()
    results, wall, steps = drain(engine, scores)
    reports.append(phase_report("score", engine, before, results, wall, steps))
    emit(reports, args.out)
    engine.close()
    return 0


def emit(reports: list[dict], out: Path | None) -> None:
    lines = [json.dumps(r) for r in reports]
    print("\n".join(lines))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
