"""Settings of a worker process (`TEACHERCACHE_*`): the service's, plus the engine loop's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from service.settings import ServiceSettings


class WorkerSettings(ServiceSettings):
    teacher: str | None = None  # default: the registry's default teacher
    worker_id: str | None = None  # default: host-pid-random
    # Leases: renewed every lease_s * renew_fraction while the worker holds the task.
    lease_s: float = 60.0
    renew_fraction: float = 0.33
    # A claim that found nothing waits for Postgres to notify that tasks were queued (service/
    # notify.py), at most claim_idle_poll_s (expired leases of dead workers are taken back then);
    # claim_poll_s is the wait while full, and while the listening connection is down.
    claim_poll_s: float = 0.2
    claim_idle_poll_s: float = 2.0
    # The interactive lane (the synchronous OpenAI/vLLM endpoints): an idle claimer is woken by
    # the notification of a trainer's tasks like any others; these are the places beyond
    # max_inflight only interactive tasks take (a trainer's batch: 64 sequences), and the share
    # of each claim kept for batch work however many interactive tasks wait (so batch jobs
    # progress).
    interactive_reserve: int = 64
    batch_share: float = Field(default=0.25, ge=0.0, le=1.0)
    # Tasks held at once (claimed, in the engine, or waiting to be indexed): keeps the engine fed.
    max_inflight: int = 256
    # ...and at most this many prompt + response tokens: score requests ask for logprobs over
    # their whole sequence, whose memory grows with tokens, not with requests.
    max_inflight_tokens: int = 262_144
    # A result shard is written when this many rows are waiting, or the oldest waited flush_s.
    result_shard_rows: int = 2048
    flush_s: float = 3.0  # less often while the engine is busy: each write takes CPU from it
    # On SIGTERM: stop claiming, let running requests finish for this long, release the rest.
    drain_s: float = 30.0
    # A storage error (a full disk, an unreachable bucket) pauses claiming: the writable check is
    # retried after storage_backoff_s, doubling up to storage_backoff_max_s, until a write succeeds.
    storage_backoff_s: float = 1.0
    storage_backoff_max_s: float = 30.0
    # Engine options (vLLM adapter).
    # KV cache of a CPU engine, GiB; default: a quarter of the free memory, at most 4 (workers/memory.py).
    kv_cache_gb: float | None = None
    # Sequences the engine runs at once; default max_inflight + interactive_reserve, so the places
    # kept for interactive work are places in the engine too (vLLM's own default, 256 on the CPU
    # build, would leave a trainer's batch waiting for batch sequences to end).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # CPU build: move this process's own threads off the cores vLLM binds its model to (workers/cpus.py).
    keep_off_engine_cores: bool = True
    # The engine registry's key (workers/main.py ENGINES): vllm | remote | scripted (a deterministic
    # stand-in for control-plane tests); unset, the teacher's source decides (remote, else vllm).
    engine: Literal["vllm", "remote", "scripted"] | None = None
    scripted_step_delay_s: float = 0.0  # scripted engine only: how long one step takes

    @property
    def engine_max_num_seqs(self) -> int:
        """What the engine is built with: `max_num_seqs`, else every place the worker fills."""
        return self.max_num_seqs or self.max_inflight + self.interactive_reserve
