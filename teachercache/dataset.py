"""PyTorch loading: an IterableDataset over a job's shards, and a collate for top-k distillation.

This module imports torch; ``import teachercache`` does not (``teachercache.ShardDataset``
and ``teachercache.collate_topk`` import it on first use).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import httpx

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("teachercache.dataset needs torch: pip install 'teachercache[loader]'") from exc

from teachercache.client import Client
from teachercache.stream import DEFAULT_BATCH_SIZE, ShardRef, read_shard, resolve_shards

Row = dict[str, Any]


class ShardDataset(IterableDataset[Row]):
    """The rows of a job's shards, read over HTTP, split across ranks and DataLoader workers.

    ``shards``: shard URLs or manifest entries; or ``job`` (id or job object) with
    ``client`` (or ``base_url``). The manifest is resolved once, here, in the main process.

    Every epoch each row is yielded exactly once across all ranks and workers: the shard
    list is shuffled with ``seed`` and the epoch (the same order on every rank), then
    reader slot ``rank * num_workers + worker_id`` reads every ``world_size * num_workers``-th
    shard. The split is by shard, so a job with fewer shards than readers leaves some
    readers idle (and DDP ranks with unequal row counts): give such jobs more shards or
    fewer readers. Call ``set_epoch(e)`` before each epoch, as with DistributedSampler
    (DataLoader copies the dataset into its workers each epoch unless
    ``persistent_workers=True``). ``shuffle_buffer > 0`` also shuffles rows within each
    reader through a buffer of that many rows. ``rank``/``world_size`` default to
    torch.distributed's when it is initialized, else 0/1.

    Each reader (worker process) makes its own Client from ``client``'s settings; a
    ``transport`` given to that client is shared with the workers, so it must be safe to
    use after fork (httpx's default transport is made fresh in each worker).

    Yields one dict per row (columns as in the shard, or the ``columns`` projection).
    """

    def __init__(
        self,
        shards: ShardRef | Iterable[ShardRef] | None = None,
        *,
        job: ShardRef | None = None,
        client: Client | None = None,
        base_url: str | None = None,
        columns: list[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        skip_errors: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if (shards is None) == (job is None):
            raise TypeError("ShardDataset takes exactly one of shards= or job=")
        # Workers rebuild the client from its options: a live connection pool must not
        # be shared across fork, and cannot be pickled for spawn.
        self.client_options = client._options if client is not None else {"base_url": base_url}
        self.shards = self._resolve(job, client) if job is not None else self._resolve(shards or [], client)
        self.columns = columns
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.rank, self.world_size = _distributed_position(rank, world_size)
        self.skip_errors = skip_errors
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for this epoch (call on every rank with the same value)."""
        self.epoch = epoch

    def shards_for_reader(self, slot: int, slots: int) -> list[dict[str, Any]]:
        """The shards reader ``slot`` of ``slots`` reads this epoch."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"teachercache:{self.seed}:{self.epoch}").shuffle(order)
        return [self.shards[i] for i in order[slot::slots]]

    def __iter__(self) -> Iterator[Row]:
        slot, slots = self._reader_slot()
        rows = self._read_rows(self.shards_for_reader(slot, slots))
        if self.shuffle_buffer > 0:
            rows = _buffer_shuffle(
                rows, self.shuffle_buffer, random.Random(f"rows:{self.seed}:{self.epoch}:{slot}")
            )
        yield from rows

    def _read_rows(self, shards: list[dict[str, Any]]) -> Iterator[Row]:
        with _reader_client(self.client_options) as client:
            for shard in shards:
                for batch in read_shard(client, shard, self.columns, self.batch_size):
                    yield from (row for row in batch.to_pylist() if not self._skipped(row))

    def _skipped(self, row: Row) -> bool:
        return self.skip_errors and row.get("finish_reason") == "error"

    def _reader_slot(self) -> tuple[int, int]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def _resolve(self, refs: ShardRef | Iterable[ShardRef], client: Client | None) -> list[dict[str, Any]]:
        if client is not None:
            return resolve_shards(refs, client)
        with Client(**self.client_options) as temporary:
            return resolve_shards(refs, temporary)


def _reader_client(options: dict[str, Any]) -> Client:
    """A client of this process; a transport the caller gave is borrowed, never closed."""
    transport = options.get("transport")
    if transport is not None:
        options = {**options, "transport": _BorrowedTransport(transport)}
    return Client(**options)


class _BorrowedTransport(httpx.BaseTransport):
    """Closing our reader client must not close the caller's transport under their client."""

    def __init__(self, transport: httpx.BaseTransport) -> None:
        self._transport = transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._transport.handle_request(request)

    def close(self) -> None:
        pass


def _distributed_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialized else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size


def _buffer_shuffle(rows: Iterator[Row], size: int, rng: random.Random) -> Iterator[Row]:
    """Approximate shuffle in bounded memory: emit a random buffered row per row read."""
    buffer: list[Row] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def collate_topk(rows: Sequence[Row], pad_id: int = 0) -> dict[str, Any]:
    """Pad a list of shard rows into the tensors of a top-k distillation step.

    Rows whose ``finish_reason`` is ``"error"`` are dropped, so ``B`` may be smaller than
    ``len(rows)``. For row ``b`` with prompt ``P`` (``p`` tokens) and completion ``C``
    (``c`` tokens), ``T`` the longest ``p + c`` of the batch and ``k`` the largest top-k:

    - ``input_ids`` [B,T] int64: ``P + C``, then ``pad_id``.
    - ``attention_mask`` [B,T] int64: 1 on the ``p + c`` real tokens, 0 on padding.
    - ``labels_mask`` [B,T] bool: True exactly on the completion, positions ``p .. p+c-1``.
    - ``top_token_ids`` [B,T,k] int64 and ``top_logprobs`` [B,T,k] float32: at position
      ``t = p + j`` the teacher's k best tokens (best first) and their logprobs for
      completion token ``j``, i.e. its distribution for predicting ``input_ids[b, t]``
      from ``input_ids[b, :t]``. Positions outside the completion hold ``pad_id`` / 0.0.
      A position with fewer than ``k`` alternatives is padded with ``pad_id`` / ``-inf``.
    - ``token_logprobs`` [B,T] float32: at ``t = p + j`` the teacher's logprob of
      ``input_ids[b, t]`` itself; 0.0 elsewhere.
    - ``custom_id``: list of B strings.

    The targets sit at the position of the token they predict, so a causal student whose
    logits at ``t`` predict token ``t + 1`` compares ``student_logits[:, :-1]`` with
    ``top_*[:, 1:]`` under ``labels_mask[:, 1:]``.
    """
    kept = [row for row in rows if row.get("finish_reason") != "error"]
    length = max((_row_length(row) for row in kept), default=0)
    k = max((len(top) for row in kept for top in row["top_token_ids"]), default=0)
    batch = _empty_batch(len(kept), length, k, pad_id)
    for index, row in enumerate(kept):
        _fill_row(batch, index, row)
    batch["custom_id"] = [row.get("custom_id") for row in kept]
    return batch


def _row_length(row: Row) -> int:
    return len(row["prompt_token_ids"]) + len(row["completion_token_ids"])


def _empty_batch(size: int, length: int, k: int, pad_id: int) -> dict[str, Any]:
    return {
        "input_ids": torch.full((size, length), pad_id, dtype=torch.int64),
        "attention_mask": torch.zeros((size, length), dtype=torch.int64),
        "labels_mask": torch.zeros((size, length), dtype=torch.bool),
        "top_token_ids": torch.full((size, length, k), pad_id, dtype=torch.int64),
        "top_logprobs": torch.zeros((size, length, k), dtype=torch.float32),
        "token_logprobs": torch.zeros((size, length), dtype=torch.float32),
    }


def _fill_row(batch: dict[str, Any], index: int, row: Row) -> None:
    prompt, completion = row["prompt_token_ids"], row["completion_token_ids"]
    start, end = len(prompt), len(prompt) + len(completion)
    batch["input_ids"][index, :end] = torch.tensor(list(prompt) + list(completion), dtype=torch.int64)
    batch["attention_mask"][index, :end] = 1
    batch["labels_mask"][index, start:end] = True
    if end > start:
        batch["token_logprobs"][index, start:end] = torch.tensor(row["token_logprobs"], dtype=torch.float32)
        _fill_top_k(batch, index, start, row)


def _fill_top_k(batch: dict[str, Any], index: int, start: int, row: Row) -> None:
    ids, logprobs = row["top_token_ids"], row["top_logprobs"]
    k = batch["top_token_ids"].shape[-1]
    if all(len(position) == k for position in ids):
        # The usual case: one tensor per row instead of one per position.
        end = start + len(ids)
        batch["top_token_ids"][index, start:end] = torch.tensor(ids, dtype=torch.int64).reshape(len(ids), k)
        batch["top_logprobs"][index, start:end] = torch.tensor(logprobs, dtype=torch.float32).reshape(
            len(ids), k
        )
        return
    for offset, (position_ids, position_logprobs) in enumerate(zip(ids, logprobs, strict=True)):
        width = len(position_ids)
        batch["top_logprobs"][index, start + offset] = float("-inf")
        batch["top_token_ids"][index, start + offset, :width] = torch.tensor(position_ids, dtype=torch.int64)
        batch["top_logprobs"][index, start + offset, :width] = torch.tensor(
            position_logprobs, dtype=torch.float32
        )
