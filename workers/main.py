"""Entry point of a worker process: one engine for one teacher."""

from __future__ import annotations

import logging
import os
import signal
import threading

from service.migrate import upgrade
from service.runtime import Runtime
from workers import memory
from workers.engine import Engine
from workers.memory import EngineStartFailed
from workers.loop import WorkerLoop
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


def build_engine(settings: WorkerSettings, rt: Runtime, teacher_name: str) -> Engine:
    teacher = rt.teachers.get(teacher_name)
    if teacher.spec.is_remote and settings.engine != "scripted":
        return build_remote_engine(teacher)
    if settings.engine == "scripted":
        from workers.scripted_engine import ScriptedEngine

        return ScriptedEngine(vocab_size=teacher.vocab_size, step_delay_s=settings.scripted_step_delay_s)
    from workers.vllm_adapter import VllmEngine  # the only path that imports vLLM

    try:
        return VllmEngine.load(
            str(teacher.folder), max_model_len=teacher.spec.max_model_len,
            max_top_logprobs=teacher.spec.max_top_logprobs, dtype=teacher.spec.dtype,
            kv_cache_gb=settings.kv_cache_gb, max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            tensor_parallel_size=teacher.spec.tensor_parallel_size,
        )
    except EngineStartFailed:
        raise
    except Exception as exc:  # vLLM's own reasons (memory, devices, the model folder) come in many types
        log.debug("engine start failed", exc_info=True)
        raise EngineStartFailed(f"the vLLM engine for {teacher_name!r} did not start ({_first_line(exc)}); "
                                f"its log above says why. Memory: set {memory.SETTING} (GiB); "
                                "batch size: TEACHERCACHE_MAX_NUM_SEQS") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def build_remote_engine(teacher) -> Engine:
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


def stop_on_signals() -> threading.Event:
    """SIGTERM/SIGINT stop the worker gracefully, even while the engine is still loading."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    return stopping


def run_worker(settings: WorkerSettings) -> int:
    stopping = stop_on_signals()
    rt = Runtime.from_settings(settings)
    upgrade(rt.database_url)
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
        close = getattr(engine, "close", None)
        if close is not None:  # a remote engine's threads may still wait on the network
            close()
