"""`make bench`: run every benchmark; each prints its table and writes bench/results/<name>.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_pipeline.py", "bench_score.py", "bench_cache.py", "bench_loader.py", "bench_remote.py", "bench_assembly.py",
              "bench_download.py", "bench_fleet_signal.py"]


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        if not (HERE / name).exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        module = f"bench.{name.removesuffix('.py')}"
        if subprocess.call([sys.executable, "-m", module], cwd=HERE.parent) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
