"""teachercache client: submit prompts to a teacher LLM, then fetch completions with the
teacher's per-token top-k logprobs for knowledge distillation.

    import teachercache as tc

    with tc.Client("http://teachercache:8080") as client:
        job = client.submit([{"custom_id": "q1", "prompt": "Hi"}], top_logprobs=20)
        job = client.wait(job, raise_on_failure=True)
        for batch in tc.stream(job, client=client, columns=["completion_token_ids"]):
            ...

``ShardDataset`` and ``collate_topk`` (PyTorch) are imported on first use, so importing
this package never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from teachercache._retry import RetryPolicy
from teachercache._version import __version__
from teachercache.client import AsyncClient, Client
from teachercache.errors import (
    APIError,
    AuthenticationError,
    ConflictError,
    IntegrityError,
    JobFailedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    ShardFormatError,
    TeachercacheError,
    TransportError,
    ValidationError,
    WaitTimeoutError,
)
from teachercache.stream import HTTPRangeFile, stream

if TYPE_CHECKING:
    from teachercache.dataset import ShardDataset, collate_topk

_TORCH_NAMES = {"ShardDataset", "collate_topk"}

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "HTTPRangeFile",
    "IntegrityError",
    "JobFailedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "ShardDataset",
    "ShardFormatError",
    "TeachercacheError",
    "TransportError",
    "ValidationError",
    "WaitTimeoutError",
    "__version__",
    "collate_topk",
    "stream",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the torch-backed names load teachercache.dataset (and torch) when first used.
    if name in _TORCH_NAMES:
        from teachercache import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'teachercache' has no attribute {name!r}")
