"""Batch layouts for top-k distillation, built from Arrow buffers with numpy and torch.

A batch is made from a ``pyarrow.Table`` of shard rows (soft labels already decoded into the
float32 columns): every list column is read as its offsets and flat values, and each value's
place in the output tensor is computed for all values at once (``_destinations``), then
written with one scatter. No Python object is made per row or per position.

Two layouts, one convention for where a target sits: the teacher's top-k for completion token
``j`` of a row is stored at that token's own position, i.e. the distribution for predicting
that token from the tokens before it. A causal student's logits at position ``t - 1`` are
compared with the target at ``t``.

- ``padded_batch`` [B, T] and [B, T, k]: the layout of ``collate_topk`` (its docstring has the
  tensors).
- ``packed_batch``: the rows' ``prompt + completion`` sequences concatenated into one row of
  ``S`` tokens, as flash-attention's varlen kernels and Hugging Face's
  ``DataCollatorWithFlattening`` take them, with targets only where they exist:

  - ``input_ids`` [1, S] int64 and ``position_ids`` [1, S] int64 (restarting at 0 per sequence).
  - ``cu_seqlens`` [n + 1] int32: sequence ``i`` is ``input_ids[0, cu_seqlens[i]:cu_seqlens[i + 1]]``;
    ``max_seqlen`` (int): the longest of them.
  - ``target_positions`` [N] int64: where, in the packed row, each completion token sits; N is
    the number of completion tokens of the batch.
  - ``target_sequence`` [N] int64: the sequence (0..n-1) each target belongs to.
  - ``top_token_ids`` [N, k] int64 and ``top_logprobs`` [N, k] float32: the teacher's k best
    tokens (best first) and their logprobs at that position; a position with fewer than ``k``
    alternatives is padded with ``pad_id`` / ``-inf``.
  - ``token_logprobs`` [N] float32: the teacher's logprob of ``input_ids[0, target_positions]``.
  - ``custom_id``: list of n strings.

  The student's hidden state (or logits) at ``target_positions - 1`` predicts the target at
  ``target_positions``. A completion token at ``position_ids == 0`` (a row with an empty
  prompt) has no position before it inside its own sequence; mask it out with
  ``position_ids[0, target_positions] > 0``, as the padded layout's ``labels_mask[:, 1:]`` does.

Rows whose ``finish_reason`` is ``"error"`` are dropped (a vectorised mask) by both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("teachercache.layouts needs torch: pip install 'teachercache[loader]'") from exc

# The columns a layout reads: what a loader projects when it builds batches.
LAYOUT_COLUMNS = [
    "custom_id",
    "prompt_token_ids",
    "completion_token_ids",
    "token_logprobs",
    "top_token_ids",
    "top_logprobs",
    "finish_reason",
]
# Read when present (a sampled job's shards; tail_logprob is in every job shard): a loader adds
# them to its projection when it asks for sampled targets or the tail mass.
SAMPLED_LAYOUT_COLUMNS = ["sample_token_ids", "sample_counts", "tail_logprob"]
LAYOUT_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int64())),
        ("completion_token_ids", pa.list_(pa.int64())),
        ("token_logprobs", pa.list_(pa.float32())),
        ("top_token_ids", pa.list_(pa.list_(pa.int64()))),
        ("top_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("finish_reason", pa.string()),
        ("sample_token_ids", pa.list_(pa.list_(pa.int64()))),
        ("sample_counts", pa.list_(pa.list_(pa.int32()))),
        ("tail_logprob", pa.list_(pa.float32())),
    ]
)
LAYOUTS = ("padded", "packed")


def without_errors(table: pa.Table) -> pa.Table:
    """The rows whose finish_reason is not ``"error"`` (all of them if the column is absent)."""
    if "finish_reason" not in table.column_names:
        return table
    failed = pc.fill_null(pc.equal(table.column("finish_reason"), "error"), False)
    return table.filter(pc.invert(failed)) if pc.any(failed).as_py() else table


def table_from_rows(rows: list[dict[str, Any]]) -> pa.Table:
    """Python rows (dicts, as ShardDataset yields them) as the table the layouts read: the
    layout columns the first row has (a projection may have left some out)."""
    first = rows[0] if rows else {}
    present = [field for field in LAYOUT_SCHEMA if field.name in first] or [
        field for field in LAYOUT_SCHEMA if field.name not in SAMPLED_LAYOUT_COLUMNS]
    return pa.Table.from_pylist(rows, schema=pa.schema(present))


@dataclass(frozen=True)
class Ragged:
    """A list column as numpy: ``offsets`` [n + 1] from 0, and ``values``: the flat values (the
    column's own dtype: the scatter into the output casts, which costs less than a converted
    copy), or for a list of lists another Ragged over the inner lists."""

    offsets: np.ndarray
    values: Any  # np.ndarray | Ragged

    @classmethod
    def of(cls, array: pa.Array) -> Ragged:
        offsets = np.asarray(array.offsets, dtype=np.int64)
        flat = array.flatten()  # a sliced array's own span of its parent's values
        values = cls.of(flat) if pa.types.is_list(flat.type) else _numpy(flat)
        return cls(offsets - offsets[0], values)

    @classmethod
    def empty(cls, rows: int, depth: int, dtype: Any) -> Ragged:
        values = np.zeros(0, dtype=dtype) if depth == 1 else cls.empty(0, depth - 1, dtype)
        return cls(np.zeros(rows + 1, dtype=np.int64), values)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def flat(self) -> Ragged:
        """The inner lists of a list of lists (positions, for top_*)."""
        return self.values  # type: ignore[no-any-return]

    def slice(self, start: int, stop: int) -> Ragged:
        low, high = self.offsets[start], self.offsets[stop]
        values = self.values[low:high] if isinstance(self.values, np.ndarray) else self.values.slice(low, high)
        return Ragged(self.offsets[start:stop + 1] - low, values)

    @staticmethod
    def concat(parts: list[Ragged]) -> Ragged:
        shifts = np.cumsum([0] + [part.offsets[-1] for part in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
        first = parts[0].values
        values = (np.concatenate([p.values for p in parts]) if isinstance(first, np.ndarray)
                  else Ragged.concat([p.values for p in parts]))
        return Ragged(offsets, values)


def _numpy(array: pa.Array) -> np.ndarray:
    if array.null_count:
        array = array.fill_null(0)
    values: np.ndarray = array.to_numpy(zero_copy_only=False)
    return values


@dataclass(frozen=True)
class Columns:
    """The columns a layout reads, for a run of rows, as numpy: made once per record batch, then
    sliced and concatenated into batches without going back to Arrow."""

    custom_id: list[str | None]
    prompt: Ragged
    completion: Ragged
    token_logprobs: Ragged
    top_ids: Ragged  # rows -> positions -> k ids
    top_logprobs: Ragged
    # Sampled soft labels and the tail mass: empty lists where the rows have none (top-k rows,
    # or not projected).
    sample_ids: Ragged  # rows -> positions -> unique drawn ids
    sample_counts: Ragged
    tail: Ragged  # rows -> positions

    @classmethod
    def of(cls, table: pa.Table) -> Columns:
        rows, names = table.num_rows, set(table.column_names)

        def ragged(name: str, depth: int, dtype: Any) -> Ragged:
            if name not in names:  # not projected: empty lists
                return Ragged.empty(rows, depth, dtype)
            return Ragged.of(table.column(name).combine_chunks())

        return cls(
            custom_id=table.column("custom_id").to_pylist() if "custom_id" in names else [None] * rows,
            prompt=ragged("prompt_token_ids", 1, np.int64),
            completion=ragged("completion_token_ids", 1, np.int64),
            token_logprobs=ragged("token_logprobs", 1, np.float32),
            top_ids=ragged("top_token_ids", 2, np.int64),
            top_logprobs=ragged("top_logprobs", 2, np.float32),
            sample_ids=ragged("sample_token_ids", 2, np.int64),
            sample_counts=ragged("sample_counts", 2, np.int32),
            tail=ragged("tail_logprob", 1, np.float32),
        )

    @property
    def count(self) -> int:
        return len(self.custom_id)

    @property
    def lengths(self) -> np.ndarray:
        """Each row's sequence length: prompt + completion tokens."""
        lengths: np.ndarray = self.prompt.lengths + self.completion.lengths
        return lengths

    def slice(self, start: int, stop: int) -> Columns:
        return Columns(self.custom_id[start:stop], *(getattr(self, name).slice(start, stop) for name in _RAGGED))

    @staticmethod
    def concat(parts: list[Columns]) -> Columns:
        if len(parts) == 1:
            return parts[0]
        return Columns([i for part in parts for i in part.custom_id],
                       *(Ragged.concat([getattr(part, name) for part in parts]) for name in _RAGGED))


_RAGGED = ("prompt", "completion", "token_logprobs", "top_ids", "top_logprobs", "sample_ids", "sample_counts", "tail")


def _destinations(offsets: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Where each flat value of a list column goes: element ``i`` of list ``r`` to ``starts[r] + i``.

    One repeat over all values: value ``v`` belongs to list ``r`` with ``offsets[r] <= v``, so its
    place is ``v + starts[r] - offsets[r]``.
    """
    places: np.ndarray = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], np.diff(offsets))
    return places


def _filled(shape: tuple[int, ...], value: float, dtype: Any) -> np.ndarray:
    # np.zeros maps fresh zero pages instead of writing them: most of the output is overwritten.
    return np.zeros(shape, dtype=dtype) if value == 0 else np.full(shape, value, dtype=dtype)


def _scatter(out: np.ndarray, where: np.ndarray, values: np.ndarray) -> None:
    out.reshape(-1)[where] = values  # one fancy-index assignment, casting as it copies


def _top_k(rows: Columns, positions: np.ndarray | None, slots: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[slots, k] arrays of the top-k, completion position ``i`` of the batch in slot ``positions[i]``
    (``None``: in slot ``i``); every other slot holds pad_id / 0.0, and a short position's missing
    entries pad_id / -inf."""
    return _per_position(rows.top_ids.flat, rows.top_logprobs.flat, positions, slots, pad_id, float("-inf"))


def _per_position(ids: Ragged, lps: Ragged, positions: np.ndarray | None, slots: int, pad_id: int,
                  missing: float) -> tuple[np.ndarray, np.ndarray]:
    """_top_k for any (ids, values) pair of list-of-list columns: `missing` fills a short position."""
    widths = ids.lengths
    k = int(widths.max()) if len(widths) else 0
    uniform = ids.offsets[-1] == len(widths) * k
    if uniform and slots == len(widths) and positions is None:
        # Packed and uniform: the flat values already are the [N, k] arrays; one converting copy each.
        return ids.values.reshape(slots, k).astype(np.int64), lps.values.reshape(slots, k).astype(np.float32)
    if positions is None:
        positions = np.arange(slots, dtype=np.int64)
    top_ids, top_logprobs = _filled((slots, k), pad_id, np.int64), np.zeros((slots, k), dtype=np.float32)
    if uniform:  # the usual case: every position has k entries, a row of k each
        top_ids[positions] = ids.values.reshape(len(widths), k)
        top_logprobs[positions] = lps.values.reshape(len(widths), k)
        return top_ids, top_logprobs
    top_logprobs[positions] = missing
    entries = _destinations(ids.offsets, positions * k)
    _scatter(top_ids, entries, ids.values)
    _scatter(top_logprobs, entries, lps.values)
    return top_ids, top_logprobs


def padded_batch(table: pa.Table, pad_id: int = 0) -> dict[str, Any]:
    """The padded layout of ``collate_topk`` (see there), from a table of rows."""
    return padded_layout(Columns.of(without_errors(table)), pad_id)


def packed_batch(table: pa.Table, pad_id: int = 0) -> dict[str, Any]:
    """The packed layout (module docstring): every row of ``table`` in one sequence of tokens."""
    return packed_layout(Columns.of(without_errors(table)), pad_id)


def padded_layout(rows: Columns, pad_id: int = 0) -> dict[str, Any]:
    """padded_batch's tensors for rows already in numpy (and without failed rows)."""
    prompt_lengths = rows.prompt.lengths
    lengths = prompt_lengths + rows.completion.lengths
    width = int(lengths.max()) if rows.count else 0
    row_starts = np.arange(rows.count, dtype=np.int64) * width
    completion_starts = row_starts + prompt_lengths
    input_ids = _filled((rows.count, width), pad_id, np.int64)
    _scatter(input_ids, _destinations(rows.prompt.offsets, row_starts), rows.prompt.values)
    completion = _destinations(rows.completion.offsets, completion_starts)
    _scatter(input_ids, completion, rows.completion.values)
    token_logprobs = np.zeros((rows.count, width), dtype=np.float32)
    # The completion's own places, unless a column's lists disagree with it in length.
    _scatter(token_logprobs, _places_like(completion, rows.completion, rows.token_logprobs, completion_starts),
             rows.token_logprobs.values)
    top_ids, top_logprobs = _top_k(rows, _places_like(completion, rows.completion, rows.top_ids, completion_starts),
                                   rows.count * width, pad_id)
    k = top_ids.shape[1]
    position = torch.arange(width)
    end, start = torch.from_numpy(lengths)[:, None], torch.from_numpy(prompt_lengths)[:, None]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": (position < end).to(torch.int64),
        "labels_mask": (position >= start) & (position < end),
        "top_token_ids": torch.from_numpy(top_ids).view(rows.count, width, k),
        "top_logprobs": torch.from_numpy(top_logprobs).view(rows.count, width, k),
        "token_logprobs": torch.from_numpy(token_logprobs),
        "custom_id": rows.custom_id,
        **_extras(rows, completion_starts, rows.count * width, pad_id, (rows.count, width)),
    }


def _extras(rows: Columns, starts: np.ndarray, slots: int, pad_id: int, shape: tuple[int, ...]) -> dict[str, Any]:
    """The sampled targets and the tail mass, where the rows have them, each position at the slot
    ``starts[row] + i`` (padded: its place in [B, T]; packed: its index among the targets).

    - ``sample_token_ids`` [..., m] int64: the unique drawn ids (``pad_id`` beyond a position's own);
    - ``sample_targets`` [..., m] float32: their counts / draws (0 beyond), the random-sampling KD
      target (Anshumann et al. 2025): each position's targets sum to 1;
    - ``tail_logprob`` [...] float32: log(1 - sum of the top-k probabilities), the ghost token.
    """
    out: dict[str, Any] = {}
    if rows.sample_ids.flat.offsets[-1] > 0:
        places = _destinations(rows.sample_ids.offsets, starts)
        ids, counts = _per_position(rows.sample_ids.flat, rows.sample_counts.flat, places, slots, pad_id, 0.0)
        totals = counts.sum(axis=1, keepdims=True)
        targets = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        m = ids.shape[1]
        out["sample_token_ids"] = torch.from_numpy(ids).view(*shape, m)
        out["sample_targets"] = torch.from_numpy(targets).view(*shape, m)
    if rows.tail.offsets[-1] > 0:
        tail = np.zeros(slots, dtype=np.float32)
        _scatter(tail, _destinations(rows.tail.offsets, starts), rows.tail.values)
        out["tail_logprob"] = torch.from_numpy(tail).view(*shape)
    return out


def _places_like(places: np.ndarray, reference: Ragged, column: Ragged, starts: np.ndarray) -> np.ndarray:
    """``column``'s destinations: the reference column's ``places`` when their lists have the same lengths."""
    if np.array_equal(column.offsets, reference.offsets):
        return places
    return _destinations(column.offsets, starts)


def packed_layout(rows: Columns, pad_id: int = 0) -> dict[str, Any]:
    """packed_batch's tensors for rows already in numpy (and without failed rows)."""
    lengths = rows.lengths
    cu_seqlens = np.zeros(rows.count + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    total = int(cu_seqlens[-1])
    starts = cu_seqlens[:-1]
    completion_starts = starts + rows.prompt.lengths
    input_ids = _filled((1, total), pad_id, np.int64)
    _scatter(input_ids, _destinations(rows.prompt.offsets, starts), rows.prompt.values)
    _scatter(input_ids, _destinations(rows.completion.offsets, completion_starts), rows.completion.values)
    # Targets are stored compactly, one per completion position, in the order of the positions.
    target_positions = _destinations(rows.top_ids.offsets, completion_starts)
    positions = len(target_positions)
    top_ids, top_logprobs = _top_k(rows, None, positions, pad_id)
    token_logprobs = np.zeros(positions, dtype=np.float32)
    _scatter(token_logprobs, _destinations(rows.token_logprobs.offsets, rows.top_ids.offsets[:-1]),
             rows.token_logprobs.values)
    sequence_of_target = np.repeat(np.arange(rows.count, dtype=np.int64), np.diff(rows.top_ids.offsets))
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids).view(1, total),
        "cu_seqlens": torch.from_numpy(cu_seqlens.astype(np.int32)),
        "max_seqlen": int(lengths.max()) if rows.count else 0,
        "target_positions": torch.from_numpy(target_positions),
        "target_sequence": torch.from_numpy(sequence_of_target),
        "top_token_ids": torch.from_numpy(top_ids),
        "top_logprobs": torch.from_numpy(top_logprobs),
        "token_logprobs": torch.from_numpy(token_logprobs),
        "custom_id": rows.custom_id,
        **_extras(rows, rows.top_ids.offsets[:-1], positions, pad_id, (positions,)),
    }


def pack_boundaries(lengths: np.ndarray, max_tokens: int) -> list[int]:
    """Where greedy packing cuts ``lengths`` (rows in order) into packs of at most ``max_tokens``
    tokens: the end index of each full pack. A row longer than the budget is a pack of its own;
    the rows after the last cut are left for the next call. One searchsorted per pack, none per row.
    """
    ends = np.cumsum(lengths)
    cuts, start, used = [], 0, 0
    while start < len(lengths):
        end = int(np.searchsorted(ends, used + max_tokens, side="right"))
        if end == len(lengths):
            break  # the rest fit: they wait for more rows (or for the end of the stream)
        end = max(end, start + 1)  # a row longer than the budget goes alone
        cuts.append(end)
        start, used = end, int(ends[end - 1])
    return cuts
