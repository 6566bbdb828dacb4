"""PyTorch loading: an IterableDataset over a job's shards, and a collate for top-k distillation.

This module imports torch; ``import teachercache`` does not (``teachercache.ShardDataset``
and ``teachercache.collate_topk`` import it on first use).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np
import pyarrow as pa

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("teachercache.dataset needs torch: pip install 'teachercache[loader]'") from exc

from teachercache._read_ahead import read_ahead
from teachercache.client import Client
from teachercache.layouts import (
    LAYOUT_COLUMNS,
    LAYOUTS,
    Columns,
    pack_boundaries,
    packed_layout,
    padded_batch,
    padded_layout,
    table_from_rows,
    without_errors,
)
from teachercache.stream import DEFAULT_BATCH_SIZE, ShardRef, read_shard, resolve_shards

Row = dict[str, Any]
T = TypeVar("T")


class ShardDataset(IterableDataset[Any]):
    """The rows of a job's shards, read over HTTP (or from local files), split across ranks and
    DataLoader workers; as Python rows, or as ready tensor batches built from the Arrow buffers.

    ``shards``: shard URLs, manifest entries or local shard files / folders (``pathlib.Path``);
    or ``job`` (id or job object) with ``client`` (or ``base_url``). The manifest is resolved
    once, here, in the main process.

    Every epoch each row is yielded exactly once across all ranks and workers: the shard
    list is shuffled with ``seed`` and the epoch (the same order on every rank), then
    reader slot ``rank * num_workers + worker_id`` reads every ``world_size * num_workers``-th
    shard. The split is by shard, so a job with fewer shards than readers leaves some
    readers idle (and DDP ranks with unequal row counts): give such jobs more shards or
    fewer readers. Call ``set_epoch(e)`` before each epoch, as with DistributedSampler
    (DataLoader copies the dataset into its workers each epoch unless
    ``persistent_workers=True``). ``shuffle_buffer > 0`` also shuffles rows within each
    reader through a buffer of that many rows (it moves row indices, not rows).
    ``rank``/``world_size`` default to torch.distributed's when it is initialized, else 0/1.

    Each reader (worker process) makes its own Client from ``client``'s settings; a
    ``transport`` given to that client is shared with the workers, so it must be safe to
    use after fork (httpx's default transport is made fresh in each worker).

    ``layout=None`` (the default) yields one dict per row (columns as in the shard, or the
    ``columns`` projection), for ``DataLoader(..., batch_size=B, collate_fn=collate_topk)``.
    ``layout="padded"`` yields the batches of ``collate_topk`` of ``rows_per_batch`` rows, and
    ``layout="packed"`` the packed batches of ``teachercache.layouts`` of at most
    ``tokens_per_batch`` tokens (a longer row is a batch of its own), both built column-wise
    from the Arrow buffers (no Python object per row): use ``DataLoader(dataset,
    batch_size=None)``. Batches never hold failed rows, and every row is in exactly one batch;
    a reader's last batch may be smaller.

    ``read_ahead``: how many record batches a reader decodes ahead, in a thread of its own,
    while its tensors are laid out (Arrow and numpy release the GIL, so the two overlap on two
    cores); 0 reads in the iterating thread. Memory: that many record batches more.
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
        layout: str | None = None,
        rows_per_batch: int = 32,
        tokens_per_batch: int = 8192,
        pad_id: int = 0,
        read_ahead: int = 2,
    ) -> None:
        if (shards is None) == (job is None):
            raise TypeError("ShardDataset takes exactly one of shards= or job=")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} or None, not {layout!r}")
        # Workers rebuild the client from its options: a live connection pool must not
        # be shared across fork, and cannot be pickled for spawn.
        self.client_options = client._options if client is not None else {"base_url": base_url}
        self.shards = self._resolve(job, client) if job is not None else self._resolve(shards or [], client)
        # A layout reads only its own columns: the others need not be fetched or decoded.
        self.columns = columns if columns is not None or layout is None else LAYOUT_COLUMNS
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.rank, self.world_size = _distributed_position(rank, world_size)
        self.skip_errors = skip_errors or layout is not None
        self.batch_size = batch_size
        self.layout, self.rows_per_batch, self.tokens_per_batch = layout, rows_per_batch, tokens_per_batch
        self.pad_id = pad_id
        self.read_ahead = read_ahead
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

    def __iter__(self) -> Iterator[Any]:
        slot, slots = self._reader_slot()
        tables = self._read_tables(self.shards_for_reader(slot, slots))
        if self.shuffle_buffer > 0:
            seed = random.Random(f"rows:{self.seed}:{self.epoch}:{slot}").getrandbits(64)
            tables = shuffled_rows(tables, self.shuffle_buffer, np.random.default_rng(seed))
        # Reading, decoding and the numpy views run a little ahead, in a thread (they release the
        # GIL), while this thread lays out the tensors (teachercache/_read_ahead.py).
        # In a DataLoader worker each batch crosses to the training process: as one buffer.
        out = in_one_shared_buffer if get_worker_info() is not None else _unchanged
        if self.layout == "padded":
            runs = row_groups(self._ahead(map(Columns.of, tables)), self.rows_per_batch)
            yield from (out(padded_layout(run, self.pad_id)) for run in runs)
        elif self.layout == "packed":
            runs = token_groups(self._ahead(map(Columns.of, tables)), self.tokens_per_batch)
            yield from (out(packed_layout(run, self.pad_id)) for run in runs)
        else:
            for table in self._ahead(tables):
                yield from table.to_pylist()

    def _ahead(self, items: Iterator[T]) -> Iterator[T]:
        return read_ahead(items, self.read_ahead) if self.read_ahead > 0 else items

    def _read_tables(self, shards: list[dict[str, Any]]) -> Iterator[pa.Table]:
        """The shards' record batches as tables, failed rows dropped if asked (a vectorised mask)."""
        client: Client | None = None  # made on the first remote shard: local files need none
        try:
            for shard in shards:
                if client is None and "path" not in shard:
                    client = _reader_client(self.client_options)
                for batch in read_shard(client, shard, self.columns, self.batch_size):
                    table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
                    yield without_errors(table) if self.skip_errors else table
        finally:
            if client is not None:
                client.close()

    def _reader_slot(self) -> tuple[int, int]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def _resolve(self, refs: ShardRef | Iterable[ShardRef], client: Client | None) -> list[dict[str, Any]]:
        if client is not None or _local_files(refs):
            return resolve_shards(refs, client)
        with Client(**self.client_options) as temporary:
            return resolve_shards(refs, temporary)


def _local_files(refs: ShardRef | Iterable[ShardRef]) -> bool:
    if isinstance(refs, (str, dict)):
        return False
    return isinstance(refs, os.PathLike) or all(isinstance(ref, os.PathLike) for ref in refs)


_ALIGN = 64  # bytes: each tensor's view starts where any dtype may start


def in_one_shared_buffer(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its tensors copied into views of one shared-memory buffer.

    DataLoader moves a worker's tensors to the main process one shared-memory segment per
    storage, each handed over through a connection to the worker (torch's file-descriptor
    strategy): several milliseconds for a batch of seven tensors, more than laying the batch
    out takes. Views of one storage cross as one segment, made shared here so that sending
    it copies nothing more. Same tensors, shapes and dtypes; they share one buffer.
    """
    tensors = {name: value for name, value in batch.items() if isinstance(value, torch.Tensor)}
    sizes = [value.numel() * value.element_size() for value in tensors.values()]
    spans = [(size + _ALIGN - 1) // _ALIGN * _ALIGN for size in sizes]
    buffer = torch.empty(sum(spans), dtype=torch.uint8).share_memory_()  # type: ignore[no-untyped-call]
    out, offset = dict(batch), 0
    for (name, value), size, span in zip(tensors.items(), sizes, spans, strict=True):
        view = buffer[offset:offset + size].view(value.dtype).view(value.shape)
        view.copy_(value)
        out[name] = view
        offset += span
    return out


def _unchanged(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def shuffled_rows(tables: Iterator[pa.Table], size: int, rng: np.random.Generator) -> Iterator[pa.Table]:
    """Approximate shuffle in bounded memory: a pool of ``size`` buffered row indices; each table
    read adds its rows to the pool and takes as many random ones out (one ``take`` per table)."""
    held: list[pa.Table] = []  # the tables whose rows are (partly) in the pool
    pool = np.zeros(0, dtype=np.int64)  # indices into the concatenation of `held`
    for table in tables:
        held.append(table)
        pool = np.concatenate([pool, np.arange(table.num_rows) + (sum(t.num_rows for t in held) - table.num_rows)])
        excess = len(pool) - size
        if excess <= 0:
            continue
        chosen = rng.choice(len(pool), excess, replace=False)
        combined = pa.concat_tables(held)
        yield combined.take(pool[chosen])
        pool = np.delete(pool, chosen)
        held, pool = _compact(combined, pool)
    if len(pool):
        yield pa.concat_tables(held).take(rng.permutation(pool))


def _compact(combined: pa.Table, pool: np.ndarray) -> tuple[list[pa.Table], np.ndarray]:
    """Drop the rows no longer in the pool from the buffer, once they are most of it, so the
    buffer stays near ``size`` rows."""
    if len(pool) * 2 >= combined.num_rows:
        return [combined], pool
    return [combined.take(np.sort(pool))], np.argsort(np.argsort(pool))


class _RowQueue:
    """Rows waiting to be batched, as the parts they came in; taking rows copies only the rows
    taken, and only when a batch spans two parts."""

    def __init__(self) -> None:
        self.parts: list[Columns] = []
        self.lengths = np.zeros(0, dtype=np.int64)  # each waiting row's sequence length

    @property
    def count(self) -> int:
        return len(self.lengths)

    def push(self, part: Columns) -> None:
        if part.count:
            self.parts.append(part)
            self.lengths = np.concatenate([self.lengths, part.lengths])

    def take(self, rows: int) -> Columns:
        taken: list[Columns] = []
        needed = rows
        while needed:
            head = self.parts[0]
            if head.count <= needed:
                taken.append(self.parts.pop(0))
            else:
                taken.append(head.slice(0, needed))
                self.parts[0] = head.slice(needed, head.count)
            needed -= taken[-1].count
        self.lengths = self.lengths[rows:]
        return Columns.concat(taken)


def row_groups(parts: Iterable[Columns], rows: int) -> Iterator[Columns]:
    """The rows of ``parts``, in order, regrouped into runs of ``rows`` rows (the last may be smaller)."""
    queue = _RowQueue()
    for part in parts:
        queue.push(part)
        while queue.count >= rows:
            yield queue.take(rows)
    if queue.count:
        yield queue.take(queue.count)


def token_groups(parts: Iterable[Columns], max_tokens: int) -> Iterator[Columns]:
    """The rows of ``parts``, in order, regrouped greedily into runs of at most ``max_tokens``
    prompt + completion tokens (a longer row alone)."""
    queue = _RowQueue()
    for part in parts:
        queue.push(part)
        taken = 0
        for cut in pack_boundaries(queue.lengths, max_tokens):
            yield queue.take(cut - taken)
            taken = cut
    if queue.count:
        yield queue.take(queue.count)


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
    return padded_batch(table_from_rows(list(rows)), pad_id)
