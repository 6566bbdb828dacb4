"""Teacher registry: the built-in teachers plus an operator's YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from service.errors import NotFound

BUILTIN_FILE = Path(__file__).with_name("builtin.yaml")


@dataclass(frozen=True)
class RemoteSource:
    """A teacher behind an OpenAI-compatible endpoint (`source: {kind: remote, ...}`).

    The API key is never part of the registry: `api_key_env` names the environment variable
    a worker reads it from when it starts.
    """

    base_url: str  # up to and including /v1, e.g. http://10.0.0.5:8000/v1
    model: str  # the name the server knows the model by
    api_key_env: str | None = None
    # completions: the prompt's token ids are sent as they are. chat: the request's messages are
    # sent and the server applies its chat template (requests must come as messages).
    api: Literal["completions", "chat"] = "completions"
    # vLLM's extra request fields (token ids, prompt logprobs, top_k, min_p, ...); off for a
    # plain OpenAI-compatible server, which rejects unknown fields.
    vllm_extensions: bool = True
    max_concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    timeout_s: float = 600.0
    max_retries: int = 6  # per engine attempt; the task's own attempts come on top
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    price_per_million_prompt_tokens: float | None = None
    price_per_million_completion_tokens: float | None = None
    kind: str = "remote"

    def __post_init__(self) -> None:
        if self.api not in ("completions", "chat"):
            raise ValueError(f"remote teacher api {self.api!r}: use 'completions' or 'chat'")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")


@dataclass(frozen=True)
class TeacherSpec:
    """What the registry says about one teacher.

    `model` is a local folder or a name the GPU host's vLLM can load; when unset, the teacher
    is prepared from `source` into `models_dir/<name>`. A remote teacher (`source.kind:
    remote`) runs elsewhere; `tokenizer` names the local folder (or a prepared teacher) whose
    tokenizer and chat template the API uses to turn prompts into the ids it sends.
    """

    name: str
    model: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    max_model_len: int = 2048
    max_top_logprobs: int = 20
    dtype: str = "auto"
    revision: str | None = None
    tokenizer: str | None = None
    # GPUs one engine spans: vLLM's tensor x pipeline parallelism; a fleet reserves that many per
    # replica. A teacher larger than one node names vLLM's Ray executor
    # (`distributed_executor_backend: ray`): its fleet replicas then reserve a placement group of
    # that many GPU bundles, which Ray may spread over nodes, and vLLM places its workers in it.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # vLLM's: None (its default), "mp" or "ray"

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"teacher {self.name!r}: {name} must be at least 1")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError(f"teacher {self.name!r}: distributed_executor_backend is "
                             f"{self.distributed_executor_backend!r}; one of mp, ray (or unset)")
        if self.is_remote:
            self.remote  # noqa: B018 -- builds the RemoteSource, which validates the source's fields
            if not self.revision:
                raise ValueError(f"remote teacher {self.name!r} needs a `revision` (it is part of the cache key)")
            if not self.tokenizer:
                raise ValueError(f"remote teacher {self.name!r} needs a `tokenizer` (a folder or a prepared teacher)")

    @property
    def is_remote(self) -> bool:
        return self.source.get("kind") == "remote"

    @property
    def remote(self) -> RemoteSource:
        return RemoteSource(**self.source)

    @property
    def takes_messages_only(self) -> bool:
        """A chat endpoint: it is sent messages, never token ids."""
        return self.is_remote and self.remote.api == "chat"

    def model_dir(self, models_dir: Path) -> Path:
        """The local folder: the weights, or for a remote teacher the tokenizer's folder."""
        if self.is_remote:
            assert self.tokenizer is not None  # a remote teacher without one fails validation
            path = Path(self.tokenizer)
            return path if path.is_absolute() or len(path.parts) > 1 else models_dir / self.tokenizer
        return Path(self.model) if self.model else models_dir / self.name

    def gpus_per_engine(self) -> int:
        """GPUs one engine of this teacher needs: none for a remote one."""
        return 0 if self.is_remote else self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def engine_on_ray_workers(self) -> bool:
        """vLLM runs this teacher's model on Ray workers (possibly on other nodes), not in-process."""
        return not self.is_remote and self.distributed_executor_backend == "ray"

    def parallelism(self) -> dict[str, Any]:
        """vLLM's engine arguments for how one engine spans GPUs (and nodes)."""
        out: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel_size,
                               "pipeline_parallel_size": self.pipeline_parallel_size}
        if self.distributed_executor_backend:
            out["distributed_executor_backend"] = self.distributed_executor_backend
        return out

    def prices(self) -> tuple[float | None, float | None]:
        """USD per million prompt and completion tokens, where the registry gives them."""
        if not self.is_remote:
            return None, None
        remote = self.remote
        return remote.price_per_million_prompt_tokens, remote.price_per_million_completion_tokens


@dataclass(frozen=True)
class Registry:
    default: str
    teachers: dict[str, TeacherSpec]

    def get(self, name: str) -> TeacherSpec:
        try:
            return self.teachers[name]
        except KeyError:
            known = ", ".join(sorted(self.teachers))
            raise NotFound(f"unknown teacher {name!r}; known teachers: {known}", field="teacher") from None


def _read(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def load_registry(extra_file: Path | None = None) -> Registry:
    """Built-in teachers, then the operator's file (entries with the same name replace built-ins)."""
    documents = [_read(BUILTIN_FILE)] + ([_read(extra_file)] if extra_file else [])
    teachers: dict[str, TeacherSpec] = {}
    default = ""
    for doc in documents:
        default = doc.get("default", default)
        for entry in doc.get("teachers", []):
            teachers[entry["name"]] = TeacherSpec(**entry)
    return Registry(default=default, teachers=teachers)
