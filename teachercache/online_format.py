"""The binary answer of the synchronous endpoints: Arrow IPC (`Accept: application/vnd.apache.arrow.stream`).

One row per position that carries logprobs, flat over the whole request (a scored batch of 64 x
256 tokens at top-20 is one record batch of 16,320 rows, not 300,000 JSON objects):

| column | type | meaning |
|---|---|---|
| `prompt_index` | int32 | which prompt of the request |
| `sample_index` | int32 | -1 for the prompt's own positions (prompt logprobs), else the generated sample |
| `position` | int32 | the token's place in prompt + completion (the prompt's first token, 0, has none) |
| `token_id` | int32 | the token there |
| `logprob` | float32 | its logprob under the teacher |
| `rank` | int32 (null) | its rank in the teacher's vocabulary, 1 = most likely (null where unknown) |
| `top_ids` | list<int32> | the top-k there, best first |
| `top_logprobs` | list<float32> | their logprobs |

Schema metadata: `teachercache.online_version`, the `model` and `top_logprobs` (k). Both sides
import this module (it is in the client package, which the server has beside it), so the layout
has one definition. `read_scores` turns it into padded numpy arrays (`Scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

MEDIA_TYPE = "application/vnd.apache.arrow.stream"
VERSION = "1"
VERSION_KEY = b"teachercache.online_version"

SCHEMA = pa.schema([
    pa.field("prompt_index", pa.int32()),
    pa.field("sample_index", pa.int32()),
    pa.field("position", pa.int32()),
    pa.field("token_id", pa.int32()),
    pa.field("logprob", pa.float32()),
    pa.field("rank", pa.int32()),
    pa.field("top_ids", pa.list_(pa.int32())),
    pa.field("top_logprobs", pa.list_(pa.float32())),
])


def schema_with(model: str, top_logprobs: int) -> pa.Schema:
    return SCHEMA.with_metadata({VERSION_KEY: VERSION.encode(), b"teachercache.model": model.encode(),
                                 b"teachercache.top_logprobs": str(top_logprobs).encode()})


def write_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def read_stream(data: bytes) -> pa.Table:
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    version = (table.schema.metadata or {}).get(VERSION_KEY, b"").decode()
    if version != VERSION:
        raise ValueError(f"not a teachercache online answer of version {VERSION} (got {version or 'none'!r})")
    return table


@dataclass
class Scores:
    """A scored batch as padded arrays, sequence-aligned: entry [b, t] is about token t of
    sequence b (t = 0 has no logprob: NaN, ids -1), padded to the longest sequence."""

    token_logprobs: np.ndarray  # float32 [B, T]
    top_ids: np.ndarray  # int32 [B, T, k]
    top_logprobs: np.ndarray  # float32 [B, T, k]
    lengths: np.ndarray  # int64 [B]

    def torch(self) -> dict[str, Any]:
        """The same arrays as torch tensors (torch is imported only here)."""
        import torch

        return {name: torch.from_numpy(getattr(self, name))
                for name in ("token_logprobs", "top_ids", "top_logprobs", "lengths")}


def read_scores(table: pa.Table, lengths: list[int]) -> Scores:
    """The prompt positions of an answer (sample_index -1) as padded arrays."""
    k = int((table.schema.metadata or {}).get(b"teachercache.top_logprobs", b"0"))
    mask = np.asarray(table.column("sample_index").to_numpy(zero_copy_only=False)) < 0
    prompt = np.asarray(table.column("prompt_index").to_numpy(zero_copy_only=False))[mask]
    position = np.asarray(table.column("position").to_numpy(zero_copy_only=False))[mask]
    batch, width = len(lengths), max(lengths, default=0)
    token_logprobs = np.full((batch, width), np.nan, np.float32)
    top_ids = np.full((batch, width, k), -1, np.int32)
    top_logprobs = np.full((batch, width, k), np.nan, np.float32)
    token_logprobs[prompt, position] = table.column("logprob").to_numpy(zero_copy_only=False)[mask]
    if k:
        ids = table.column("top_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        lps = table.column("top_logprobs").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        top_ids[prompt, position] = ids[mask]
        top_logprobs[prompt, position] = lps[mask]
    return Scores(token_logprobs, top_ids, top_logprobs, np.asarray(lengths, np.int64))
