"""Settings of the API process (and of the tools that share its database and storage)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

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
    # Where shards live: a local folder by default, or any URI pyarrow.fs understands (s3://bucket/prefix).
    storage_uri: str | None = None
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
    max_upload_bytes: int = 256 * 1024 * 1024  # POST /v1/files: OpenAI batch input files may be 200 MB
    # Longest text of one field (a prompt, a message, a response), checked before it is tokenized.
    max_text_chars: int = 4 * 1024 * 1024
    max_requests_per_job: int = 200_000
    # Prompt tokens + max_tokens x n per request (generate) or + response tokens (score), summed.
    max_tokens_per_job: int = 200_000_000
    max_top_logprobs: int = 20
    max_completion_tokens: int = 8192
    max_pending_requests_per_tenant: int = 2_000_000
    # Per-tenant submissions (jobs and batches): a token bucket shared by every API replica.
    submissions_per_minute: float = 120.0
    submission_burst: int = 30
    shard_rows: int = 10_000
    finalizer_poll_s: float = 0.5
    db_retry_attempts: int = 8
    # How long a request waits for a pooled connection before it answers 503 (Retry-After).
    db_pool_timeout_s: float = 5.0

    @property
    def shards_uri(self) -> str:
        return self.storage_uri or str(self.state_dir / "shards")


@lru_cache
def get_settings() -> ServiceSettings:
    return ServiceSettings()
