"""Settings of the API process (and of the tools that share its database and storage)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ServiceSettings(BaseSettings):
    """Everything the API and the admin commands read from the environment (`TEACHERCACHE_*`)."""

    model_config = SettingsConfigDict(env_prefix="TEACHERCACHE_", env_file=".env", extra="ignore")

    # Unset means: start the embedded PostgreSQL server under `state_dir`. `DATABASE_URL` also works.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("TEACHERCACHE_DATABASE_URL", "DATABASE_URL")
    )
    state_dir: Path = PROJECT_ROOT / ".state"
    # Where shards and files live: a local folder by default, or s3://bucket/prefix (with the
    # standard AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
    storage_uri: str | None = None
    # On an object store a shard URL answers 307 to a presigned URL ("redirect": students read
    # straight from the store) or streams the object through the API ("proxy": Range, HEAD, ETag).
    storage_download: Literal["redirect", "proxy"] = "redirect"
    presign_expires_s: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    models_dir: Path = PROJECT_ROOT / "models"
    # Operator-defined teachers (YAML); merged over the built-in registry.
    teachers_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    # Public base URL used to build shard URLs; defaults to the request's own base URL.
    public_url: str | None = None
    # In production a shard URL is never built from the Host header a client sent (it would let
    # a caller point URLs the service hands out at a host of its choosing): set `public_url`, or
    # name the hosts that may be trusted; other requests that need a URL answer 421.
    production: bool = False
    allowed_hosts: list[str] = []
    # Limits, each refused with an error naming it (413 body, 422 job, 429 tenant).
    # Request bodies, per route (413, before the body is read when Content-Length says so).
    max_body_bytes: int = 256 * 1024 * 1024  # POST /v1/jobs: the client streams a JSONL file as one body
    max_request_body_bytes: int = 16 * 1024 * 1024  # every other route (a completion, a batch, ...)
    # POST /v1/files, streamed to storage: a native job's input file of 10^7 requests is gigabytes
    # (an OpenAI batch still refuses an input file over OpenAI's own 200 MB).
    max_upload_bytes: int = 16 * 1024 * 1024 * 1024
    # Longest text of one field (a prompt, a message, a response), checked before it is tokenized.
    max_text_chars: int = 4 * 1024 * 1024
    # A job from an input file (`input_file_id`) is read as a stream: 10^7 requests are normal.
    # A job given inline (`requests`) is bounded by max_body_bytes as well, being parsed whole.
    max_requests_per_job: int = 10_000_000
    # Prompt tokens + max_tokens x n per request (generate) or + response tokens (score), summed:
    # 10^7 requests of 2,000 tokens each.
    max_tokens_per_job: int = 20_000_000_000
    max_top_logprobs: int = 20
    max_completion_tokens: int = 8192
    # Two jobs of 10^7 requests in flight.
    max_pending_requests_per_tenant: int = 20_000_000
    # Per-tenant submissions (jobs and batches): a token bucket shared by every API replica.
    submissions_per_minute: float = 120.0
    submission_burst: int = 30
    shard_rows: int = 10_000
    # Finalizers look for ready jobs when Postgres notifies that one is (service/notify.py), and
    # otherwise every finalizer_idle_poll_s; every finalizer_poll_s while the listening connection
    # is down. Periodic work costs nothing when nothing changed.
    finalizer_poll_s: float = 0.5
    finalizer_idle_poll_s: float = Field(default=10.0, gt=0)
    # The synchronous endpoints (service/online): how long a request waits for the teacher before
    # a 504 (its jobs are then cancelled). It is woken when Postgres notifies that its jobs are
    # ready (service/notify.py) and otherwise looks every online_idle_poll_s; while the listening
    # connection is down it polls from online_poll_s, growing to 10x that.
    online_timeout_s: float = 600.0
    online_poll_s: float = 0.005
    online_idle_poll_s: float = Field(default=10.0, gt=0)
    # A job whose assembly fails is retried after finalize_backoff_s x 2^attempt (at most 5 min),
    # and ends `failed` with the reason after finalize_max_attempts.
    finalize_max_attempts: int = Field(default=5, ge=1)
    finalize_backoff_s: float = Field(default=2.0, gt=0)
    # Assembly reads and writes this many rows at a time, whatever the job's size: its memory is
    # about this many rows' worth (plus one result-shard row group per shard it reads from).
    assembly_batch_rows: int = Field(default=4096, ge=1)
    db_retry_attempts: int = 8
    # A worker, API or fleet process that starts while the database is down (a restart, a
    # failover, the database's own pod starting after ours) waits this long for it, then exits.
    db_startup_wait_s: float = Field(default=120.0, ge=0)
    # How long a request waits for a pooled connection before it answers 503 (Retry-After).
    db_pool_timeout_s: float = 5.0
    # Retention, enforced by a bounded sweep in every finalizer loop every retention_sweep_s.
    # A finished job (its rows and shards, never the cache) is deleted this long after it ended;
    # 0 or unset keeps jobs until DELETE /v1/jobs/{id}. OpenAI keeps batch files 30 days.
    job_retention_s: float | None = Field(default=30 * 24 * 3600, ge=0)
    # The cache's budget (unset: unbounded): at most this many entries, none unused for longer
    # than this, and result shards of at most this many stored bytes; least recently used
    # entries go first (a shard's bytes come back once it holds no entry).
    cache_max_entries: int | None = Field(default=None, ge=0)
    cache_max_idle_s: float | None = Field(default=None, gt=0)
    cache_max_bytes: int | None = Field(default=None, ge=0)
    retention_sweep_s: float = Field(default=60.0, gt=0)
    # The status page's chart: a snapshot of each running job's counts this often (job_progress).
    progress_every_s: float = Field(default=5.0, gt=0)
    # Jobs deleted / entries evicted per sweep transaction, at most: the sweep's bound.
    retention_batch: int = Field(default=500, ge=1)
    # A job with more requests than this is deleted in chunks of this many rows, one transaction
    # each (it is hidden first), at most retention_delete_chunks of them per sweep.
    retention_delete_rows: int = Field(default=10_000, ge=1)
    retention_delete_chunks: int = Field(default=100, ge=1)
    # A worker not seen for this long is deleted by the sweep (what its engine ran is kept in
    # its teacher's totals), so the workers table holds the fleet, not its history.
    worker_gone_s: float = Field(default=3600.0, gt=0)
    # An idle task (no request waits on it: its jobs were cancelled or expired) is deleted this
    # long after it was queued; 0 or unset keeps idle tasks. A resubmission queues it again.
    idle_task_retention_s: float | None = Field(default=7 * 24 * 3600, ge=0)

    @property
    def shards_uri(self) -> str:
        return self.storage_uri or str(self.state_dir / "shards")


@lru_cache
def get_settings() -> ServiceSettings:
    return ServiceSettings()
