"""`make bench`: run every benchmark; each prints its table and writes bench/results/<name>.json.

    .venv/bin/python -m bench.run [--ingest-requests N] [--scale-rows N]
        # make bench INGEST_REQUESTS=N SCALE_ROWS=N

`--ingest-requests` is bench_ingest.py's file size (default 1,000,000). `--scale-rows` is
bench_scale.py's large fill (default 10^6; the 10^7 run takes a quarter of an hour to fill on a
2-core host, so it is the manual `python -m bench.bench_scale --rows 10000000`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_pipeline.py", "bench_score.py", "bench_cache.py", "bench_loader.py", "bench_remote.py", "bench_assembly.py",
              "bench_download.py", "bench_soft_labels.py", "bench_ingest.py",
              "bench_fleet_signal.py", "bench_scale.py", "bench_status_page.py"]


def arguments_of(name: str, args: argparse.Namespace) -> list[str]:
    """The size flags each benchmark takes from `make bench`."""
    return {"bench_ingest.py": ["--requests", str(args.ingest_requests)],
            "bench_scale.py": ["--rows", str(args.scale_rows)]}.get(name, [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run every benchmark")
    parser.add_argument("--ingest-requests", type=int, default=1_000_000,
                        help="requests in each JSONL file of bench_ingest (token-id and text prompts)")
    parser.add_argument("--scale-rows", type=int, default=1_000_000, help="bench_scale.py's large fill")
    args = parser.parse_args(argv)
    failed = []
    for name in BENCHMARKS:
        if not (HERE / name).exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        module = f"bench.{name.removesuffix('.py')}"
        if subprocess.call([sys.executable, "-m", module, *arguments_of(name, args)], cwd=HERE.parent) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
