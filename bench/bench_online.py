"""A trainer-like client scoring through teachercache's synchronous endpoint vs directly against
`vllm serve` of the same teacher, same run.

    .venv/bin/python -m bench.bench_online [--batches 4] [--sequences 64] [--tokens 256] [--top-logprobs 20]
    .venv/bin/python -m bench.bench_online --busy-only [--busy-requests 2000]  # steps 2 and 4 only

The client sends what on-policy trainers send (ms-swift's TeacherAPIClient): POST /v1/completions
with a batch of token-id sequences, `max_tokens` 0, `echo`, `logprobs` k, and reads the JSON.
1. direct: `vllm serve` (bench/vllm_serve.py) answers `--batches` distinct batches; then it stops
   (one vLLM engine at a time on a small machine).
2. teachercache, idle: the API on loopback (uvicorn) and one worker loop on the local vLLM engine
   answer the same batches (an empty cache: computed); throughput ratio and added p50/p99.
3. cached: the same batches again, answered from the cache.
4. busy: a batch job of `--busy-requests` generate requests keeps the worker busy while new
   batches are scored through the interactive lane: their p50 against the idle p50.
5. Arrow: one cached batch answered as Arrow IPC (`Accept: application/vnd.apache.arrow.stream`)
   against its JSON: bytes and client parse time.
Writes bench/results/online.json. `--busy-only` runs the interactive lane's check alone (idle,
then busy; no `vllm serve`, no cached or Arrow phase) and writes bench/results/online_busy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

TEACHER = "smollm2-135m-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--top-logprobs", type=int, default=20)
    p.add_argument("--busy-requests", type=int, default=2000)
    p.add_argument("--busy-max-tokens", type=int, default=64)
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--busy-only", action="store_true",
                   help="only the interactive lane's check: idle vs busy p50 (no vllm serve, cached or Arrow phase)")
    return p.parse_args(argv)


def batches_of(args: argparse.Namespace, seed: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(10, 40000, args.tokens).tolist() for _ in range(args.sequences)]
            for _ in range(args.batches)]


def score_body(model: str, batch: list[list[int]], k: int) -> dict[str, Any]:
    return {"model": model, "prompt": batch, "max_tokens": 0, "temperature": 0, "echo": True, "logprobs": k}


def timed_batches(client: httpx.Client, url: str, model: str, batches: list[list[list[int]]], k: int,
                  headers: dict[str, str] | None = None) -> list[float]:
    """Seconds per batch, including reading the JSON as a trainer does."""
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        response = client.post(url, json=score_body(model, batch, k), headers=headers or {})
        response.raise_for_status()
        if not headers:
            answer = response.json()
            assert len(answer["choices"]) == len(batch)
        seconds.append(time.perf_counter() - started)
    return seconds


def summary(seconds: list[float], tokens_per_batch: int) -> dict[str, float]:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"p50_s": statistics.median(ordered), "p99_s": p99,
            "tokens_per_s": tokens_per_batch * len(seconds) / sum(seconds)}


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def run_direct(args: argparse.Namespace, batches: list[list[list[int]]], model_dir: Path) -> list[float]:
    from bench.vllm_serve import SERVED_NAME, vllm_serve

    with tempfile.TemporaryDirectory() as tmp, vllm_serve(model_dir, Path(tmp) / "serve.log",
                                                           kv_cache_gb=f"{args.kv_cache_gb:g}") as base_url:
        with httpx.Client(timeout=900) as client:
            timed_batches(client, f"{base_url}/completions", SERVED_NAME, batches[:1], args.top_logprobs)  # warm-up
            return timed_batches(client, f"{base_url}/completions", SERVED_NAME, batches, args.top_logprobs)


def run_service(args: argparse.Namespace, batches: list[list[list[int]]], busy_batches: list[list[list[int]]],
                warm: list[list[list[int]]], model_dir: Path) -> dict[str, Any]:
    from bench.common import bench_auth, scratch_runtime
    from service.http.app import create_app
    from workers.loop import WorkerLoop
    from workers.settings import WorkerSettings
    from workers.vllm_adapter import VllmEngine

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, scratch_runtime(Path(tmp)) as rt:
        settings = WorkerSettings(**rt.settings.model_dump())
        engine = VllmEngine.load(str(model_dir), max_model_len=2048, max_top_logprobs=20, dtype="float32",
                                 kv_cache_gb=args.kv_cache_gb, max_num_seqs=settings.engine_max_num_seqs,
                                 keep_off_engine_cores=True)  # as a worker does (workers/main.py)
        worker = WorkerLoop(rt, engine, settings, TEACHER)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        headers = bench_auth(rt)
        url = "/v1/completions"
        with serve_app(create_app(rt)) as base, httpx.Client(base_url=base, headers=headers, timeout=900) as client:
            timed_batches(client, url, TEACHER, warm, args.top_logprobs)  # warm-up (not in the cache of the rest)
            out["idle"] = timed_batches(client, url, TEACHER, batches, args.top_logprobs)
            if not args.busy_only:
                out.update(cached_phases(client, url, args, batches))
            busy = {"teacher": TEACHER, "mode": "generate", "top_logprobs": 20,
                    "sampling": {"max_tokens": args.busy_max_tokens, "ignore_eos": True},
                    "requests": [{"prompt_token_ids": [1, 2, 3, 100 + i]} for i in range(args.busy_requests)]}
            job = client.post("/v1/jobs", json=busy).json()
            time.sleep(5)  # the worker is full of batch work
            out["busy"] = timed_batches(client, url, TEACHER, busy_batches, args.top_logprobs)
            out["busy_job_pending_after"] = client.get(f"/v1/jobs/{job['id']}").json()["counts"]["pending"]
            client.post(f"/v1/jobs/{job['id']}/cancel")
        worker.request_stop()
        thread.join(120)
        engine.close()
    return out


def cached_phases(client: httpx.Client, url: str, args: argparse.Namespace,
                  batches: list[list[list[int]]]) -> dict[str, Any]:
    """The same batches again (from the cache), as JSON and as Arrow IPC, and one batch's sizes."""
    from teachercache.online_format import MEDIA_TYPE, read_stream

    out: dict[str, Any] = {"cached": timed_batches(client, url, TEACHER, batches, args.top_logprobs)}
    # Arrow vs JSON on one cached batch: bytes and client-side parse time.
    body = score_body(TEACHER, batches[0], args.top_logprobs)
    as_json = client.post(url, json=body)
    as_arrow = client.post(url, json=body, headers={"Accept": MEDIA_TYPE})
    started = time.perf_counter()
    json.loads(as_json.content)
    json_parse = time.perf_counter() - started
    started = time.perf_counter()
    read_stream(as_arrow.content)
    arrow_parse = time.perf_counter() - started
    out["arrow"] = {"json_bytes": len(as_json.content), "arrow_bytes": len(as_arrow.content),
                    "json_parse_s": json_parse, "arrow_parse_s": arrow_parse}
    out["arrow_cached"] = timed_batches(client, url, TEACHER, batches, args.top_logprobs,
                                        headers={"Accept": MEDIA_TYPE})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.common import report
    from service.settings import PROJECT_ROOT

    args = parse_args(argv)
    model_dir = PROJECT_ROOT / "models" / TEACHER
    batches, busy_batches, warm = batches_of(args, 0), batches_of(args, 1), batches_of(args, 2)[:1]
    tokens = args.sequences * args.tokens
    if args.busy_only:
        return report_busy(args, run_service(args, batches, busy_batches, warm, model_dir), tokens)
    direct = run_direct(args, batches, model_dir)
    service = run_service(args, batches, busy_batches, warm, model_dir)
    d, idle, cached = summary(direct, tokens), summary(service["idle"], tokens), summary(service["cached"], tokens)
    busy, arrow_cached = summary(service["busy"], tokens), summary(service["arrow_cached"], tokens)
    rows = [
        {"path": "vllm serve (direct)", **d, "vs direct": 1.0},
        {"path": "teachercache, computed", **idle, "vs direct": idle["tokens_per_s"] / d["tokens_per_s"]},
        {"path": "teachercache, cached", **cached, "vs direct": cached["tokens_per_s"] / d["tokens_per_s"]},
        {"path": "teachercache, cached, Arrow", **arrow_cached,
         "vs direct": arrow_cached["tokens_per_s"] / d["tokens_per_s"]},
        {"path": "teachercache, computed, worker busy", **busy, "vs direct": busy["tokens_per_s"] / d["tokens_per_s"]},
    ]
    extra = {
        "args": vars(args),
        "throughput_ratio": idle["tokens_per_s"] / d["tokens_per_s"],
        "added_p50_s": idle["p50_s"] - d["p50_s"], "added_p99_s": idle["p99_s"] - d["p99_s"],
        "busy_p50_over_idle_p50": busy["p50_s"] / idle["p50_s"],
        "cached_speedup": idle["p50_s"] / cached["p50_s"],
        "cached_arrow_speedup": idle["p50_s"] / arrow_cached["p50_s"],
        "arrow": service["arrow"], "busy_job_pending_after": service["busy_job_pending_after"],
        "seconds": {"direct": direct, **{k: service[k] for k in ("idle", "cached", "arrow_cached", "busy")}},
        "load_average_1_5_15_min": os.getloadavg(),  # what else ran meanwhile (1 is the engine alone)
    }
    report(f"{args.batches} batches of {args.sequences} x {args.tokens} tokens, top-{args.top_logprobs}", rows,
           "online.json", extra)
    print(json.dumps({k: v for k, v in extra.items() if k not in ("seconds", "args")}, indent=1))
    return extra


def report_busy(args: argparse.Namespace, service: dict[str, Any], tokens: int) -> dict[str, Any]:
    """--busy-only: the interactive lane's figure alone (target: busy p50 within 2x of idle)."""
    from bench.common import report

    idle, busy = summary(service["idle"], tokens), summary(service["busy"], tokens)
    rows = [{"path": "teachercache, computed", **idle, "p50 vs idle": 1.0},
            {"path": "teachercache, computed, worker busy", **busy, "p50 vs idle": busy["p50_s"] / idle["p50_s"]}]
    extra = {"args": vars(args), "busy_p50_over_idle_p50": busy["p50_s"] / idle["p50_s"],
             "busy_job_pending_after": service["busy_job_pending_after"],
             "seconds": {k: service[k] for k in ("idle", "busy")},
             "load_average_1_5_15_min": os.getloadavg()}
    report(f"busy vs idle: {args.batches} batches of {args.sequences} x {args.tokens} tokens, top-{args.top_logprobs}",
           rows, "online_busy.json", extra)
    print(json.dumps({k: v for k, v in extra.items() if k not in ("seconds", "args")}, indent=1))
    return extra


if __name__ == "__main__":
    main()
