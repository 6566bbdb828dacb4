"""`vllm serve` for the default teacher on a loopback port, as the remote-teacher tests and
benchmark run it: the flags the local adapter uses (raw logprobs, no chunked prefill on CPU,
float32, seed 0, no generation config), max logprobs 21 (the chat path asks for top-k + 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.processes import ServerFailed, free_port, stop_process_group, wait_until_answering

SERVED_NAME = "smollm2"


def serve_command(model_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "2048", "--max-logprobs", "21", "--logprobs-mode", "raw_logprobs",
            "--no-enable-chunked-prefill", "--seed", "0", "--generation-config", "vllm", "--disable-log-stats"]


@contextmanager
def vllm_serve(model_dir: Path, log: Path, start_s: float = 400, kv_cache_gb: str = "1") -> Iterator[str]:
    """Yields the base URL (`http://127.0.0.1:<port>/v1`); the server's process group is stopped after."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": kv_cache_gb}
    process = subprocess.Popen(serve_command(model_dir, port), env=env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        try:
            wait_until_answering(process, f"{base_url}/models", start_s, "vllm serve", interval=1)
        except ServerFailed as exc:
            raise ServerFailed(f"{exc}:\n{log.read_text()[-3000:]}") from exc
        yield base_url
    finally:
        stop_process_group(process)
