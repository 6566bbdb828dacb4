"""`make bench`: run every benchmark; each prints its table and writes bench/results/<name>.json.

    .venv/bin/python -m bench.run [--ingest-requests N] [--scale-rows N] [--cached-file-requests N]
        # make bench INGEST_REQUESTS=N SCALE_ROWS=N CACHED_FILE_REQUESTS=N

`--ingest-requests` is bench_ingest.py's file size (default 1,000,000). `--scale-rows` is
bench_scale.py's large fill (default 10^6; the 10^7 run takes a quarter of an hour to fill on a
2-core host, so it is the manual `python -m bench.bench_scale --rows 10000000`).
`--cached-file-requests` is the fully cached file job bench_scale runs a second time with
`--cached-file` (default 1,000,000; 0 skips it).
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


def runs_of(name: str, args: argparse.Namespace) -> list[list[str]]:
    """The runs of each benchmark `make bench` makes: the size flags of each."""
    scale = [["--rows", str(args.scale_rows)]]
    if args.cached_file_requests:
        scale.append(["--cached-file", str(args.cached_file_requests)])
    return {"bench_ingest.py": [["--requests", str(args.ingest_requests)]], "bench_scale.py": scale}.get(name, [[]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run every benchmark")
    parser.add_argument("--ingest-requests", type=int, default=1_000_000,
                        help="requests in each JSONL file of bench_ingest (token-id and text prompts)")
    parser.add_argument("--scale-rows", type=int, default=1_000_000, help="bench_scale.py's large fill")
    parser.add_argument("--cached-file-requests", type=int, default=1_000_000,
                        help="bench_scale.py's fully cached file job (0: not run)")
    args = parser.parse_args(argv)
    failed = []
    for name in BENCHMARKS:
        if not (HERE / name).exists():
            continue
        module = f"bench.{name.removesuffix('.py')}"
        for flags in runs_of(name, args):
            print(f"\n=== {' '.join([name, *flags])} ===", flush=True)
            if subprocess.call([sys.executable, "-m", module, *flags], cwd=HERE.parent) != 0:
                failed.append(" ".join([name, *flags]))
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
