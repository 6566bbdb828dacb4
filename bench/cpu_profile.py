"""Where the CPU goes during a benchmark's timed part.

`CpuAccount` reads the CPU seconds (user + system, from /proc through psutil) of every thread of
this process, of its children (vLLM's engine core) and of the Postgres backends serving the
benchmark's database, at the start and the end of the timed part: exact, and free enough to be
on in every run. Threads are named by what runs in them (the worker's claimer, writer,
heartbeat, the finalizer, the engine loop, the API's threads, the client) and grouped into
components. With `pyspy_out`, py-spy samples this process and its children meanwhile
(`--nonblocking`: it never pauses them) for the functions; with pg_stat_statements preloaded in
the server, the statements the run executed are listed by their total time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

# Thread name (as Python knows it) -> component. Threads Python does not know (vLLM's and
# torch's native threads, ZMQ's) are "native threads"; the rest go by their name.
COMPONENTS = {
    "MainThread": "client (this process's main thread: POST, polls, download)",
    "run": "worker engine loop (vLLM frontend step + rows)",
    "_claimer": "worker claimer",
    "_writer": "worker writer (Parquet + index)",
    "_heartbeat": "worker heartbeat",
    "finalizer": "finalizers (worker's and API's)",
}


ENDED = "threads of this process that ended during the run"


def _component(name: str) -> str:
    key = name.split(" (")[-1].rstrip(")") if name.startswith("Thread-") else name
    if key in COMPONENTS:
        return COMPONENTS[key]
    if "AnyIO" in name or "asyncio" in name:
        return "API (ASGI event loop + handler threads)"
    if name.startswith("remote-teacher"):
        return "worker remote-teacher HTTP threads"
    return f"other Python thread: {key}"


class CpuAccount:
    """CPU seconds per component over a `with` block; `result()` after it."""

    def __init__(self, database_url: str | None = None, pyspy_out: Path | None = None,
                 main_thread_component: str | None = None) -> None:
        self.database_url = database_url
        self.pyspy_out = pyspy_out
        self.main_thread_component = main_thread_component
        self._pyspy: subprocess.Popen[bytes] | None = None
        self.wall_s = 0.0
        self._before: dict[str, float] = {}
        self._after: dict[str, float] = {}
        self.statements: list[dict[str, Any]] = []

    # -- sampling ---------------------------------------------------------------------------
    def _threads(self) -> dict[int, str]:
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        if self.main_thread_component:
            names[threading.main_thread().native_id or 0] = "__main__"
        return names

    def _snapshot(self) -> dict[str, float]:
        seconds: dict[str, float] = defaultdict(float)
        me = psutil.Process()
        names = self._threads()
        times = me.cpu_times()
        seconds[ENDED] = times.user + times.system  # less the live threads' below: those that ended
        for thread in me.threads():
            name = names.get(thread.id)
            if name == "__main__":
                component = self.main_thread_component or COMPONENTS["MainThread"]
            elif name is None:
                component = "threads Python does not name (native: vLLM's, torch's, ZMQ's; or ended)"
            else:
                component = _component(name)
            seconds[component] += thread.user_time + thread.system_time
            seconds[ENDED] -= thread.user_time + thread.system_time
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "py-spy" in child.name():
                    continue
                times = child.cpu_times()
                seconds["vLLM (child processes: the engine core, or vllm serve)"] += times.user + times.system
        for pid in self._backend_pids():
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                seconds["Postgres backends (this database)"] += times.user + times.system
        return dict(seconds)

    def _backend_pids(self) -> list[int]:
        if not self.database_url:
            return []
        engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as db:
                return [int(p) for p in db.scalars(sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"))]
        finally:
            engine.dispose()

    def _statements(self, reset: bool) -> None:
        """pg_stat_statements for this database: reset at the start, read at the end."""
        if not self.database_url:
            return
        engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as db:
                db.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
                dbid = db.scalar(sa.text("SELECT oid FROM pg_database WHERE datname = current_database()"))
                if reset:
                    db.execute(sa.text("SELECT pg_stat_statements_reset(0, :dbid, 0)"), {"dbid": dbid})
                    return
                rows = db.execute(sa.text(
                    "SELECT calls, total_exec_time + total_plan_time AS ms, rows, left(regexp_replace(query, "
                    "'\\s+', ' ', 'g'), 110) AS query FROM pg_stat_statements WHERE dbid = :dbid "
                    "ORDER BY 2 DESC LIMIT 12"), {"dbid": dbid}).mappings()
                self.statements = [{**r, "ms": round(float(r["ms"]), 1)} for r in rows]
        except sa.exc.DBAPIError as exc:  # not preloaded: the statements are not listed
            self.statements = [{"query": f"pg_stat_statements unavailable: {str(exc).splitlines()[0]}"}]
        finally:
            engine.dispose()

    # -- the block --------------------------------------------------------------------------
    def __enter__(self) -> CpuAccount:
        self._statements(reset=True)
        if self.pyspy_out:
            self.pyspy_out.parent.mkdir(parents=True, exist_ok=True)
            py_spy = Path(sys.executable).with_name("py-spy")
            self._pyspy = subprocess.Popen(
                [str(py_spy), "record", "--pid", str(os.getpid()), "--rate", "100", "--nonblocking",
                 "--threads", "--subprocesses", "--format", "raw", "-o", str(self.pyspy_out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached before the timed part starts
        self._before = self._snapshot()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._started
        self._after = self._snapshot()
        self._statements(reset=False)
        if self._pyspy is not None:
            self._pyspy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._pyspy.wait(60)

    def result(self) -> dict[str, Any]:
        """CPU seconds per component and each one's share of all CPU used in the block."""
        used = {k: self._after.get(k, 0.0) - self._before.get(k, 0.0) for k in self._after}
        used = {k: v for k, v in used.items() if v > 0.005}
        total = sum(used.values())
        rows = [{"component": k, "cpu_s": round(v, 2), "share": round(v / total, 4) if total else 0.0}
                for k, v in sorted(used.items(), key=lambda kv: -kv[1])]
        return {"wall_s": round(self.wall_s, 2), "cpu_s": round(total, 2), "components": rows,
                "statements": self.statements}


PROJECT_DIRS = ("service/", "workers/", "teachercache/", "bench/")


def top_functions(raw: Path, limit: int = 25, skip_process: str = "EngineCore") -> list[dict[str, Any]]:
    """Where this process's threads spent their samples, from py-spy's raw output (`--threads
    --subprocesses`): per thread, the innermost frame of the project's own code (else the
    innermost frame), with its share of all samples outside `skip_process` (vLLM's engine core,
    measured apart)."""
    counts: Counter[tuple[str, str]] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[0].startswith("process"):
            if skip_process in frames[0]:
                continue
            frames = frames[1:]
        if not frames or not frames[0].startswith("thread"):
            continue
        thread = frames[0].split(": ", 1)[-1]
        own = [f for f in frames[1:] if any(f"({d}" in f for d in PROJECT_DIRS)]
        where = own[-1] if own else frames[-1]
        n = int(count)
        total += n
        counts[(_component(thread), where)] += n
    return [{"component": t, "function": f, "samples": n, "share": round(n / total, 4)}
            for (t, f), n in counts.most_common(limit)]
