"""Submission at scale: a job from an uploaded JSONL file, requests/s accepted and the API's peak RSS.

    .venv/bin/python -m bench.bench_ingest [--requests 1000000] [--kinds token_ids text] [--profile]

For each kind of prompt (`token_ids`: 64 token ids per line; `text`: about 200 characters of
plain text, tokenized by the teacher's tokenizer), a JSONL file of N distinct requests is
written to disk, then sent to the API running as a child process (uvicorn, on a fresh scratch
database each kind; its finalizer is off, so only the submission runs there):
`POST /v1/files` (streamed from disk) and `POST /v1/jobs` with `input_file_id` are timed
separately, and the API's RSS is read from /proc before and at its peak (VmHWM) after. The
baseline, measured in the same run against the same API: `--baseline-requests` other requests
of the same kind submitted as one JSON body (`requests`, the path a job took before files; it
parses the body whole, so it is measured at a size it can take); `ratio` is the file job's
requests/s over the body's. `--profile` runs one submission of the token-id file in this process
under cProfile and prints the top functions. Uses TEACHERCACHE_DATABASE_URL or the local
Postgres. Writes bench/results/ingest.json. Target: >= 50,000 requests/s for token-id prompts.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.common import bench_key, report, rss_mb, scratch_runtime  # noqa: E402
from bench.processes import free_port, stop_process_group, wait_until_answering  # noqa: E402

TEACHER = "smollm2-135m-instruct"
TARGET_TOKEN_IDS_PER_S = 50_000
WORDS = ("the teacher model reads every prompt once and the student learns from its soft labels while "
         "the cache answers repeated requests without computing them again").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1_000_000, help="requests in each file")
    p.add_argument("--kinds", nargs="+", default=["token_ids", "text"], choices=["token_ids", "text"])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--baseline-requests", type=int, default=100_000, help="requests of the body-path baseline")
    p.add_argument("--profile", action="store_true", help="cProfile one token-id submission in this process")
    return p.parse_args(argv)


def write_file(path: Path, count: int, kind: str, prompt_tokens: int = 64, first: int = 0) -> int:
    """A JSONL file of `count` distinct requests (numbered from `first`); its size in bytes."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(first, first + count):
            if kind == "token_ids":
                ids = [1000 + int(d) for d in str(i)] + [rng.randrange(49152) for _ in range(prompt_tokens)]
                request = {"custom_id": f"q{i}", "prompt_token_ids": ids}
            else:
                words = " ".join(rng.choice(WORDS) for _ in range(30))
                request = {"custom_id": f"q{i}", "prompt": f"Request {i}: {words}."}
            f.write(json.dumps(request, separators=(",", ":")) + "\n")
    return path.stat().st_size


@contextmanager
def api_process(rt):
    """The API in a child process (uvicorn on a free loopback port): (base URL, pid)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen([sys.executable, "-m", "bench.bench_ingest", "--serve", rt.database_url,
                                str(rt.settings.state_dir), str(port)], env=env, start_new_session=True,
                               cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(process, f"{url}/healthz", timeout=120, what="the API")
        yield url, process.pid
    finally:
        stop_process_group(process)


def serve(database_url: str, state_dir: str, port: int) -> None:
    import uvicorn

    from service.http.app import create_app
    from service.runtime import Runtime
    from service.settings import PROJECT_ROOT, ServiceSettings

    settings = ServiceSettings(database_url=database_url, state_dir=Path(state_dir), models_dir=PROJECT_ROOT / "models")
    uvicorn.run(create_app(Runtime(settings, database_url), run_finalizer=False), host="127.0.0.1", port=port,
                log_level="warning")


def upload(client: httpx.Client, path: Path) -> dict:
    with path.open("rb") as f:  # httpx streams the open file in chunks
        response = client.post("/v1/files", files={"file": (path.name, f, "application/jsonl")},
                               data={"purpose": "batch"})
    response.raise_for_status()
    return response.json()


def create_job(client: httpx.Client, file_id: str, **fields) -> httpx.Response:
    return client.post("/v1/jobs", json={"teacher": TEACHER, "input_file_id": file_id, "top_logprobs": 8,
                                         "sampling": {"max_tokens": 32}, **fields})


def api_client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(30, read=None))


def load_tokenizer(client: httpx.Client) -> None:
    """One text request, refused after tokenizing (its max_tokens is over the teacher's context)."""
    body = {"teacher": TEACHER, "requests": [{"prompt": "hello"}], "sampling": {"max_tokens": 8192}}
    if client.post("/v1/jobs", json=body).status_code != 422:
        raise RuntimeError("the warm-up request was not refused")


def measure_submission(rt, path: Path, baseline_path: Path) -> dict:
    """Upload, then create the job, against an API child; times, the job's counts and RSS; then the
    baseline (the body path) on the same API."""
    key = bench_key(rt)
    with api_process(rt) as (url, pid), api_client(url, key) as client:
        load_tokenizer(client)  # before the RSS baseline: the job's growth is what is measured
        before = rss_mb(pid)
        started = time.perf_counter()
        file = upload(client, path)
        uploaded = time.perf_counter()
        response = create_job(client, file["id"])
        created = time.perf_counter()
        peak = rss_mb(pid, "VmHWM")
        body_s = time_body_job(client, baseline_path)
    if response.status_code != 201:
        raise RuntimeError(f"job creation answered {response.status_code}: {response.text[:500]}")
    job = response.json()
    return {"upload_s": uploaded - started, "create_s": created - uploaded, "total": job["counts"]["total"],
            "pending": job["counts"]["pending"], "rss_before_mb": before, "rss_peak_mb": peak,
            "rss_growth_mb": peak - before, "body_s": body_s}


def time_body_job(client: httpx.Client, path: Path) -> float:
    """The baseline: the file's requests as one JSON body (`requests`), POST to 201."""
    with path.open() as f:
        requests = [json.loads(line) for line in f]
    content = json.dumps({"teacher": TEACHER, "top_logprobs": 8, "sampling": {"max_tokens": 32},
                          "requests": requests}).encode()
    started = time.perf_counter()
    response = client.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})
    elapsed = time.perf_counter() - started
    if response.status_code != 201:
        raise RuntimeError(f"the baseline body job answered {response.status_code}: {response.text[:500]}")
    return elapsed


def run_kind(kind: str, args: argparse.Namespace, folder: Path) -> dict:
    path = folder / f"{kind}.jsonl"
    started = time.perf_counter()
    size = write_file(path, args.requests, kind, args.prompt_tokens)
    print(f"{kind}: wrote {args.requests} requests ({size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s",
          flush=True)
    baseline_path = folder / f"{kind}-baseline.jsonl"
    write_file(baseline_path, args.baseline_requests, kind, args.prompt_tokens, first=args.requests)
    with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
        measured = measure_submission(rt, path, baseline_path)
    if measured["total"] != args.requests:
        raise RuntimeError(f"the job has {measured['total']} requests, not {args.requests}")
    path.unlink()
    create_per_s = args.requests / measured["create_s"]
    body_per_s = args.baseline_requests / measured.pop("body_s")
    return {"prompts": kind, "requests": args.requests, "file_mib": size / 2**20, **measured,
            "upload_mib_per_s": size / 2**20 / measured["upload_s"], "create_requests_per_s": create_per_s,
            "end_to_end_requests_per_s": args.requests / (measured["upload_s"] + measured["create_s"]),
            "baseline_body_requests": args.baseline_requests, "baseline_body_requests_per_s": body_per_s,
            "ratio": create_per_s / body_per_s}


def profile_submission(args: argparse.Namespace, folder: Path, top: int = 25) -> None:
    """One token-id submission through JobService in this process, under cProfile."""
    from service.jobs.limits import JobLimits
    from service.jobs.schemas import JobCreate
    from service.jobs.service import JobService
    from service.openai_batch.service import OpenAIBatchService

    path = folder / "profile.jsonl"
    write_file(path, min(args.requests, 200_000), "token_ids", args.prompt_tokens)
    with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state)) as rt:
        bench_key(rt)  # creates the tenant
        with rt.sessions() as db, db.begin(), path.open("rb") as f:
            file_id = OpenAIBatchService(db, "bench", rt.storage, rt.teachers).upload(path.name, "batch", f).id
        body = JobCreate(teacher=TEACHER, input_file_id=file_id, top_logprobs=8, sampling={"max_tokens": 32})
        teacher = rt.teachers.get(TEACHER)
        profiler = cProfile.Profile()
        with rt.sessions() as db, db.begin():
            profiler.enable()
            JobService(db, "bench", JobLimits.from_settings(rt.settings)).submit_file(body, teacher, rt.storage)
            profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        if args.profile:
            profile_submission(args, Path(folder))
            return 0
        rows = [run_kind(kind, args, Path(folder)) for kind in args.kinds]
    os.environ.setdefault("COLUMNS", "220")  # rich truncates the table to 80 columns when piped
    token_rows = [r for r in rows if r["prompts"] == "token_ids"]
    report(f"job from a JSONL file: POST /v1/files, then POST /v1/jobs (input_file_id); {os.cpu_count()} CPUs",
           rows, "ingest.json", {"args": vars(args), "target_token_ids_per_s": TARGET_TOKEN_IDS_PER_S,
                                 "python": platform.python_version(), "cpus": os.cpu_count()})
    slow = [r for r in token_rows if r["create_requests_per_s"] < TARGET_TOKEN_IDS_PER_S]
    if slow:
        print(f"below the target of {TARGET_TOKEN_IDS_PER_S} token-id requests/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
