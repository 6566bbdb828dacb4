"""`make bench`: run every benchmark; each prints its table and writes bench/results/<name>.json.

    .venv/bin/python -m bench.run [--scale-rows N]     # make bench SCALE_ROWS=N

`--scale-rows` is bench_scale.py's large fill (default 10^6; the 10^7 run takes a quarter of an
hour to fill on a 2-core host, so it is the manual `python -m bench.bench_scale --rows 10000000`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_pipeline.py", "bench_score.py", "bench_cache.py", "bench_loader.py", "bench_remote.py", "bench_assembly.py",
              "bench_download.py", "bench_scale.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale-rows", type=int, default=1_000_000, help="bench_scale.py's large fill")
    args = parser.parse_args()
    extra = {"bench_scale.py": ["--rows", str(args.scale_rows)]}
    failed = []
    for name in BENCHMARKS:
        if not (HERE / name).exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        module = f"bench.{name.removesuffix('.py')}"
        if subprocess.call([sys.executable, "-m", module, *extra.get(name, [])], cwd=HERE.parent) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
