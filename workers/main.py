"""Entry point of a worker process: one engine for one teacher."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from service.migrate import upgrade_on_start
from service.runtime import Runtime
from service.teachers.tokenizer import Teacher
from workers import memory
from workers.engine import Engine
from workers.loop import WorkerLoop
from workers.memory import EngineStartFailed
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


# The registry of engines, keyed by kind: a new engine is one factory and one entry here.
EngineFactory = Callable[[WorkerSettings, Teacher], Engine]


def engine_kind(settings: WorkerSettings, teacher: Teacher) -> str:
    """The registry key: TEACHERCACHE_ENGINE when set (`scripted` in control-plane tests), else
    what the teacher's source runs on (a remote teacher over HTTP, any other on vLLM)."""
    return settings.engine or ("remote" if teacher.spec.is_remote else "vllm")


def build_engine(settings: WorkerSettings, rt: Runtime, teacher_name: str) -> Engine:
    teacher = rt.teachers.get(teacher_name)
    return ENGINES[engine_kind(settings, teacher)](settings, teacher)


def load_scripted_engine(settings: WorkerSettings, teacher: Teacher) -> Engine:
    from workers.scripted_engine import ScriptedEngine

    return ScriptedEngine(vocab_size=teacher.vocab_size, step_delay_s=settings.scripted_step_delay_s)


def load_vllm_engine(settings: WorkerSettings, teacher: Teacher) -> Engine:
    from workers.vllm_adapter import VllmEngine  # the only path that imports vLLM

    try:
        return VllmEngine.load(
            str(teacher.folder), max_model_len=teacher.spec.max_model_len,
            max_top_logprobs=teacher.spec.max_top_logprobs, dtype=teacher.spec.dtype,
            kv_cache_gb=settings.kv_cache_gb, max_num_seqs=settings.engine_max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            keep_off_engine_cores=settings.keep_off_engine_cores,
            **teacher.spec.parallelism(),
        )
    except EngineStartFailed:
        raise
    except Exception as exc:  # vLLM's own reasons (memory, devices, the model folder) come in many types
        log.debug("engine start failed", exc_info=True)
        raise EngineStartFailed(f"the vLLM engine for {teacher.name!r} did not start ({_first_line(exc)}); "
                                f"its log above says why. Memory: set {memory.SETTING} (GiB); "
                                "batch size: TEACHERCACHE_MAX_NUM_SEQS") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_remote_engine(settings: WorkerSettings, teacher: Teacher) -> Engine:
    return build_remote_engine(teacher)


def build_remote_engine(teacher: Teacher) -> Engine:
    """A teacher behind an HTTP endpoint: no GPU, no vLLM import, the key from the environment."""
    from transformers import AutoTokenizer

    from workers.remote_adapter import RemoteClient, RemoteEngine

    source = teacher.spec.remote
    api_key = None
    if source.api_key_env:
        api_key = os.environ.get(source.api_key_env)
        if not api_key:
            raise SystemExit(f"teacher {teacher.name!r}: environment variable {source.api_key_env} is not set")
    return RemoteEngine(RemoteClient(source, api_key), AutoTokenizer.from_pretrained(teacher.folder),
                        max_model_len=teacher.spec.max_model_len, max_top_logprobs=teacher.spec.max_top_logprobs)


ENGINES: dict[str, EngineFactory] = {
    "vllm": load_vllm_engine,
    "remote": load_remote_engine,
    "scripted": load_scripted_engine,
}


def stop_on_signals() -> threading.Event:
    """SIGTERM/SIGINT stop the worker gracefully, even while the engine is still loading."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    return stopping


def run_worker(settings: WorkerSettings) -> int:
    stopping = stop_on_signals()
    rt = Runtime.from_settings(settings)
    upgrade_on_start(rt.database_url, settings.db_startup_wait_s)
    return serve(rt, settings, stopping)


def serve(rt: Runtime, settings: WorkerSettings, stopping: threading.Event) -> int:
    """Load the teacher's engine and run the worker loop until `stopping` is set (a signal, or a
    fleet draining its replica) or the engine dies; return the exit code."""
    teacher_name = rt.teachers.get(settings.teacher).name
    return run_loop(rt, build_engine(settings, rt, teacher_name), settings, teacher_name, stopping)


def run_loop(rt: Runtime, engine: Engine, settings: WorkerSettings, teacher_name: str,
             stopping: threading.Event) -> int:
    """The worker loop on a loaded engine, which is closed when the loop ends."""
    try:
        if stopping.is_set():
            return 0
        return WorkerLoop(rt, engine, settings, teacher_name, stopping).run()
    finally:
        engine.close()  # now, not at exit: vLLM's engine process, a remote engine's network threads
