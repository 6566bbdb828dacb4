"""A remote teacher through the service against a plain client of the same server, same run.

    .venv/bin/python -m bench.bench_remote [--requests 128] [--max-tokens 64] [--top-logprobs 20]

One `vllm serve` of the default teacher on loopback (bench/vllm_serve.py). The baseline is
what a user would script: a pool of `--concurrency` threads POSTing each prompt's token ids to
/v1/completions with the same parameters and top-k logprobs. The service side is the whole
path: POST /v1/jobs, a worker loop whose engine is the remote adapter (same concurrency),
result shards written and indexed, the job's shards assembled and downloaded. Baseline runs
before and after the service run; their mean is the reference. Writes bench/results/remote.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

REMOTE = "smollm2-remote"


def completion_body(prompt: list[int], args: argparse.Namespace) -> dict:
    return {"model": "smollm2", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 1.0, "seed": 0,
            "logprobs": args.top_logprobs, "ignore_eos": args.ignore_eos}


def run_direct(base_url: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """The plain client: concurrent POSTs, completion tokens counted from `usage`."""
    with httpx.Client(base_url=base_url, timeout=600) as client, ThreadPoolExecutor(args.concurrency) as pool:
        def post(prompt: list[int]) -> int:
            response = client.post("/completions", json=completion_body(prompt, args))
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        tokens = sum(pool.map(post, prompts))
        elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def run_service(rt, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    from bench.common import timed_service_job
    from workers.main import build_remote_engine

    engine = build_remote_engine(rt.teachers.get(REMOTE))
    body = {"teacher": REMOTE, "top_logprobs": args.top_logprobs, "cache": "bypass",
            "sampling": {"max_tokens": args.max_tokens, "temperature": 1.0, "seed": 0, "ignore_eos": args.ignore_eos},
            "requests": [{"custom_id": str(i), "prompt_token_ids": p} for i, p in enumerate(prompts)]}
    try:
        return timed_service_job(rt, engine, body, args.flush_s, args.poll_s)
    finally:
        engine.close()


def teachers_file(state: Path, base_url: str, concurrency: int) -> Path:
    entry = {"name": REMOTE, "revision": "bench-vllm-serve", "tokenizer": "smollm2-135m-instruct",
             "max_model_len": 2048, "dtype": "float32",
             "source": {"kind": "remote", "base_url": base_url, "model": "smollm2", "max_concurrency": concurrency}}
    path = state / "teachers.yaml"
    path.write_text(yaml.safe_dump({"teachers": [entry]}))
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight, both sides")
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens per request")
    parser.add_argument("--flush-s", type=float, default=3.0)
    parser.add_argument("--poll-s", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=1, help="before/service/after rounds on one server; median ratio")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from bench.bench_pipeline import prompts as chat_prompts
    from bench.common import report_rounds, scratch_runtime, timed_baseline
    from bench.vllm_serve import vllm_serve
    from service.settings import PROJECT_ROOT, ServiceSettings
    from service.teachers.catalog import TeacherCatalog

    teacher = TeacherCatalog.from_settings(ServiceSettings()).get(None)
    prompts = chat_prompts(teacher, args.requests)
    with tempfile.TemporaryDirectory() as tmp, vllm_serve(PROJECT_ROOT / "models" / teacher.name,
                                                         Path(tmp) / "server.log", kv_cache_gb="4") as base_url:
        run_direct(base_url, prompts[:8], args)  # warm-up: the first batch after load is several times slower
        with scratch_runtime(Path(tmp), teachers_file=teachers_file(Path(tmp), base_url, args.concurrency)) as rt:
            run_service(rt, prompts[:8], args)  # the service's too (its first claim, shard, assembly)
        label = "plain client (httpx threads)"
        rounds = []
        for _ in range(args.rounds):
            before = timed_baseline(lambda: run_direct(base_url, prompts, args), label)
            with scratch_runtime(Path(tmp), teachers_file=teachers_file(Path(tmp), base_url, args.concurrency)) as rt:
                service = run_service(rt, prompts, args)
            after = timed_baseline(lambda: run_direct(base_url, prompts, args), label)
            rounds.append((before, service, after))
    report_rounds(f"remote teacher (vllm serve on loopback), {args.requests} x {args.max_tokens} tokens, "
                 f"top-{args.top_logprobs}", "plain client", rounds, "remote.json", args)


if __name__ == "__main__":
    main()
