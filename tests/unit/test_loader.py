"""The student-side loader: stream() over range requests, ShardDataset's split across ranks
and DataLoader workers, and collate_topk's tensor layout. Shards with the contract's
columns are written to tmp_path and served by a shard-serving contract double (a FastAPI
app imitating DESIGN.md's job, manifest and shard routes) through the client's transport."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse

import teachercache as tc
from teachercache.shard_format import SCHEMA_VERSION_KEY, shard_metadata
from teachercache.soft_labels import Encoding, encode, stored_schema
from teachercache.testing import SyncASGITransport

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

BASE_URL = "http://teachercache.test"
JOB_ID = "job_loader"
K = 3
SHARD_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("request_index", pa.int32()),
        ("sample_index", pa.int32()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("completion_token_ids", pa.list_(pa.int32())),
        ("completion_text", pa.string()),
        ("token_logprobs", pa.list_(pa.float32())),
        ("top_token_ids", pa.list_(pa.list_(pa.int32()))),
        ("top_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
        ("cached", pa.bool_()),
    ],
    metadata=shard_metadata({"teacher": "double"}),
)


def make_row(index: int) -> dict[str, Any]:
    """A row whose every value says where it belongs (all exact in float32)."""
    if index == 7:
        return {
            **make_row(0),
            "custom_id": "q7",
            "request_index": 7,
            "completion_token_ids": [],
            "completion_text": "",
            "token_logprobs": [],
            "top_token_ids": [],
            "top_logprobs": [],
            "finish_reason": "error",
            "error": "boom",
        }
    prompt = [1000 * index + i for i in range(2 + index % 3)]
    completion = [1000 * index + 100 + j for j in range(1 + index % 4)]
    return {
        "custom_id": f"q{index}",
        "request_index": index,
        "sample_index": 0,
        "prompt_token_ids": prompt,
        "completion_token_ids": completion,
        "completion_text": "t" * len(completion),
        "token_logprobs": [-0.5 * (j + 1) for j in range(len(completion))],
        "top_token_ids": [[token + r for r in range(K)] for token in completion],
        "top_logprobs": [[-0.25 * (j + 1) - r for r in range(K)] for j in range(len(completion))],
        "finish_reason": "length",
        "error": None,
        "cached": index % 2 == 0,
    }


class ShardServerDouble:
    """The contract's read side: a finished job, its manifest and Range-honouring shard files."""

    def __init__(self, folder: Path, rows_per_shard: list[int], row_group_size: int = 2,
                 schema: pa.Schema = SHARD_SCHEMA, encoding: str = "float32") -> None:
        self.folder, self.row_group_size, self.schema = folder, row_group_size, schema
        self.encoding = encoding
        self.range_headers: list[str | None] = []
        self.rows: list[dict[str, Any]] = []
        self.manifest = [self._write_shard(index, count) for index, count in enumerate(rows_per_shard)]
        self.app = FastAPI()
        self.app.get("/v1/jobs/{job_id}")(self._job)
        self.app.get("/v1/jobs/{job_id}/shards")(self._shards)
        self.app.get("/v1/shards/{name}")(self._shard_file)

    def _write_shard(self, index: int, count: int) -> dict[str, Any]:
        rows = [make_row(len(self.rows) + i) for i in range(count)]
        self.rows += rows
        path = self.folder / f"part-{index:05d}.parquet"
        # Small row groups by default: a reader must seek around the file, not read it front to back.
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if self.encoding != "float32":  # as the service's assembly writes a job that asked for it
            encoding = Encoding.named(self.encoding)
            table = encode(table, encoding, stored_schema(self.schema, encoding))
        pq.write_table(table, path, row_group_size=self.row_group_size)
        data = path.read_bytes()
        return {
            "index": index,
            "url": f"/v1/shards/{path.name}",
            "rows": count,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    async def _job(self, job_id: str) -> dict[str, Any]:
        return {"id": job_id, "status": "succeeded", "shards": self.manifest}

    async def _shards(self, job_id: str) -> dict[str, Any]:
        return {"shards": self.manifest}

    async def _shard_file(self, name: str, request: Request) -> FileResponse:
        self.range_headers.append(request.headers.get("range"))
        return FileResponse(self.folder / name)


@pytest.fixture
def server(tmp_path: Path) -> ShardServerDouble:
    return ShardServerDouble(tmp_path, rows_per_shard=[3, 4, 2, 5, 3])


@pytest.fixture
def client(server: ShardServerDouble) -> Any:
    with tc.Client(BASE_URL, transport=SyncASGITransport(server.app)) as client:
        yield client


def key(row: dict[str, Any]) -> tuple[int, int]:
    return row["request_index"], row["sample_index"]


# -- stream ------------------------------------------------------------------------


def test_stream_reads_every_row_through_range_requests(client: tc.Client, server: ShardServerDouble) -> None:
    batches = list(tc.stream(JOB_ID, client=client, batch_size=2))
    assert all(isinstance(batch, pa.RecordBatch) and batch.num_rows <= 2 for batch in batches)
    assert pa.Table.from_batches(batches).to_pylist() == server.rows
    assert server.range_headers and all(
        header and header.startswith("bytes=") for header in server.range_headers
    )


def test_stream_projects_columns(client: tc.Client, server: ShardServerDouble) -> None:
    columns = ["custom_id", "top_logprobs"]
    table = pa.Table.from_batches(list(tc.stream(JOB_ID, client=client, columns=columns)))
    assert table.column_names == columns
    assert table.to_pylist() == [{name: row[name] for name in columns} for row in server.rows]


def bytes_requested(range_headers: list[str | None]) -> int:
    spans = [header.removeprefix("bytes=").split("-") for header in range_headers if header]
    return sum(int(end) - int(start) + 1 for start, end in spans)


def test_projection_fetches_only_the_projected_column_chunks(tmp_path: Path) -> None:
    # A shard much larger than the footer read, so column chunks must be fetched by range.
    server = ShardServerDouble(tmp_path, rows_per_shard=[3000], row_group_size=1000)
    size = server.manifest[0]["bytes"]
    with tc.Client(BASE_URL, transport=SyncASGITransport(server.app)) as client:
        assert sum(batch.num_rows for batch in tc.stream(JOB_ID, client=client)) == 3000
        assert bytes_requested(server.range_headers) >= size
        server.range_headers.clear()
        assert sum(batch.num_rows for batch in tc.stream(JOB_ID, client=client, columns=["cached"])) == 3000
    assert bytes_requested(server.range_headers) < size / 2


def test_stream_takes_urls_manifest_entries_or_a_job_object(
    client: tc.Client, server: ShardServerDouble
) -> None:
    urls = [entry["url"] for entry in server.manifest]
    absolute = [BASE_URL + url for url in urls]
    job = client.get(JOB_ID)
    for source in (urls, absolute, server.manifest, job):
        rows = pa.Table.from_batches(list(tc.stream(source, client=client))).to_pylist()
        assert rows == server.rows
    single = pa.Table.from_batches(list(tc.stream(urls[1], client=client))).to_pylist()
    assert single == server.rows[3:7]


def test_http_range_file_reads_like_a_local_file(client: tc.Client, server: ShardServerDouble) -> None:
    local = (server.folder / "part-00000.parquet").read_bytes()
    remote = tc.HTTPRangeFile(client, server.manifest[0]["url"])  # size from a range probe
    assert remote.size == len(local)
    remote.seek(-8, 2)
    assert remote.read(100) == local[-8:] and remote.read(10) == b""
    remote.seek(4)
    assert remote.read(10) == local[4:14] and remote.tell() == 14
    assert server.range_headers[-2:] == [f"bytes={len(local) - 8}-{len(local) - 1}", "bytes=4-13"]


# -- ShardDataset ------------------------------------------------------------------


def test_two_ranks_with_two_workers_each_read_every_row_exactly_once(
    client: tc.Client, server: ShardServerDouble
) -> None:
    per_rank = []
    for rank in (0, 1):
        dataset = tc.ShardDataset(job=JOB_ID, client=client, rank=rank, world_size=2, seed=3)
        per_rank.append([key(row) for row in DataLoader(dataset, batch_size=None, num_workers=2)])
    seen = Counter(per_rank[0] + per_rank[1])
    assert seen == Counter(key(row) for row in server.rows)
    assert set(seen.values()) == {1} and all(per_rank)


def test_set_epoch_reshuffles_shards_and_still_covers_every_row(
    client: tc.Client, server: ShardServerDouble
) -> None:
    dataset = tc.ShardDataset([entry["url"] for entry in server.manifest], client=client, seed=3)
    orders = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        orders.append([shard["url"] for shard in dataset.shards_for_reader(0, 1)])
        assert Counter(key(row) for row in dataset) == Counter(key(row) for row in server.rows)
    assert len({tuple(order) for order in orders}) > 1


def test_shuffle_buffer_and_skip_errors(client: tc.Client, server: ShardServerDouble) -> None:
    dataset = tc.ShardDataset(job=JOB_ID, client=client, shuffle_buffer=4, skip_errors=True)
    rows = [key(row) for row in dataset]
    expected = [key(row) for row in server.rows if row["finish_reason"] != "error"]
    assert sorted(rows) == sorted(expected) and len(rows) == len(expected)


def test_dataset_projects_columns(client: tc.Client) -> None:
    dataset = tc.ShardDataset(job=JOB_ID, client=client, columns=["custom_id", "request_index"])
    assert set(next(iter(dataset))) == {"custom_id", "request_index"}


# -- collate_topk ------------------------------------------------------------------


def test_collate_holds_the_stored_values_at_the_documented_positions(
    client: tc.Client, server: ShardServerDouble
) -> None:
    rows = list(tc.ShardDataset(job=JOB_ID, client=client, shuffle=False))
    batch = tc.collate_topk(rows, pad_id=-1)
    kept = [row for row in rows if row["finish_reason"] != "error"]
    assert batch["custom_id"] == [row["custom_id"] for row in kept]  # the error row is gone
    length = max(len(row["prompt_token_ids"]) + len(row["completion_token_ids"]) for row in kept)
    assert batch["input_ids"].shape == (len(kept), length) and batch["top_logprobs"].shape == (
        len(kept),
        length,
        K,
    )
    for b, row in enumerate(kept):
        assert_row_layout(batch, b, row, length)


def assert_row_layout(batch: dict[str, Any], b: int, row: dict[str, Any], length: int) -> None:
    p, c = len(row["prompt_token_ids"]), len(row["completion_token_ids"])
    assert batch["input_ids"][b].tolist() == row["prompt_token_ids"] + row["completion_token_ids"] + [-1] * (
        length - p - c
    )
    assert batch["attention_mask"][b].tolist() == [1] * (p + c) + [0] * (length - p - c)
    assert batch["labels_mask"][b].tolist() == [False] * p + [True] * c + [False] * (length - p - c)
    for j in range(c):
        # Position p + j holds the teacher's view of completion token j, i.e. of input_ids[p + j].
        assert batch["top_token_ids"][b, p + j].tolist() == row["top_token_ids"][j]
        assert batch["top_logprobs"][b, p + j].tolist() == row["top_logprobs"][j]
        assert batch["token_logprobs"][b, p + j].item() == row["token_logprobs"][j]
        assert batch["top_token_ids"][b, p + j, 0].item() == batch["input_ids"][b, p + j].item()
    outside = [t for t in range(length) if not p <= t < p + c]
    assert (batch["top_token_ids"][b, outside] == -1).all() and (batch["top_logprobs"][b, outside] == 0).all()
    assert (batch["token_logprobs"][b, outside] == 0).all()


def test_collate_dtypes_and_ragged_top_k() -> None:
    row = {
        "custom_id": "r",
        "prompt_token_ids": [5],
        "completion_token_ids": [6, 7],
        "token_logprobs": [-1.0, -2.0],
        "top_token_ids": [[6, 9], [7]],
        "top_logprobs": [[-1.0, -3.0], [-2.0]],
        "finish_reason": "stop",
    }
    batch = tc.collate_topk([row])
    assert batch["input_ids"].dtype == torch.int64 and batch["labels_mask"].dtype == torch.bool
    assert batch["top_token_ids"].dtype == torch.int64 and batch["top_logprobs"].dtype == torch.float32
    assert batch["token_logprobs"].dtype == torch.float32 and batch["attention_mask"].dtype == torch.int64
    assert batch["top_token_ids"][0].tolist() == [[0, 0], [6, 9], [7, 0]]
    assert batch["top_logprobs"][0].tolist() == [[0.0, 0.0], [-1.0, -3.0], [-2.0, float("-inf")]]


def test_collate_of_only_failed_rows_is_empty() -> None:
    batch = tc.collate_topk([make_row(7)])
    assert batch["input_ids"].shape == (0, 0) and batch["top_logprobs"].shape == (0, 0, 0)


@pytest.mark.parametrize("metadata", [{**SHARD_SCHEMA.metadata, SCHEMA_VERSION_KEY: b"99"}, {}],
                         ids=["unknown-version", "no-version"])
def test_every_reader_refuses_a_shard_whose_schema_version_it_does_not_know(tmp_path: Path, metadata) -> None:
    server = ShardServerDouble(tmp_path, rows_per_shard=[2], schema=SHARD_SCHEMA.with_metadata(metadata))
    with tc.Client(BASE_URL, transport=SyncASGITransport(server.app)) as client:
        with pytest.raises(tc.ShardFormatError, match="99" if metadata else "schema_version") as stream_error:
            list(tc.stream(JOB_ID, client=client))
        assert "/v1/shards/part-00000.parquet" in str(stream_error.value)
        with pytest.raises(tc.ShardFormatError):
            list(tc.ShardDataset(job=JOB_ID, client=client, shuffle=False))


@pytest.mark.parametrize("encoding", ["float16", "compact"])
def test_every_reader_decodes_an_encoded_job_into_the_same_arrays(tmp_path: Path, encoding: str) -> None:
    """The rows' logprobs are multiples of 1/4, exact in float16 and in compact's 1/16 steps: the
    decoded rows, streamed batches and collated tensors equal float32's."""
    (tmp_path / "float32").mkdir()
    (tmp_path / encoding).mkdir()
    exact = ShardServerDouble(tmp_path / "float32", rows_per_shard=[3, 4])
    encoded = ShardServerDouble(tmp_path / encoding, rows_per_shard=[3, 4], encoding=encoding)
    with tc.Client(BASE_URL, transport=SyncASGITransport(exact.app)) as a, \
            tc.Client(BASE_URL, transport=SyncASGITransport(encoded.app)) as b:
        streamed = [r.to_pylist() for r in tc.stream(JOB_ID, client=b)]
        assert streamed == [r.to_pylist() for r in tc.stream(JOB_ID, client=a)]
        projected = [r for batch in tc.stream(JOB_ID, client=b, columns=["top_logprobs"]) for r in batch.to_pylist()]
        assert projected == [{"top_logprobs": row["top_logprobs"]} for row in exact.rows]
        rows_a = list(tc.ShardDataset(job=JOB_ID, client=a, shuffle=False))
        rows_b = list(tc.ShardDataset(job=JOB_ID, client=b, shuffle=False))
        assert rows_b == rows_a
        batch_a, batch_b = tc.collate_topk(rows_a), tc.collate_topk(rows_b)
        assert all(torch.equal(batch_a[name], batch_b[name]) for name in batch_a if name != "custom_id")
        for layout in ("padded", "packed"):  # the columnar layouts read the same decoded arrays
            packs_a = list(tc.ShardDataset(job=JOB_ID, client=a, shuffle=False, layout=layout))
            packs_b = list(tc.ShardDataset(job=JOB_ID, client=b, shuffle=False, layout=layout))
            assert len(packs_a) == len(packs_b) == 1
            assert all(torch.equal(packs_a[0][name], packs_b[0][name]) for name in packs_a[0]
                       if isinstance(packs_a[0][name], torch.Tensor))


# -- the columnar layouts ------------------------------------------------------------


def kept_rows(server: ShardServerDouble) -> list[dict[str, Any]]:
    return [row for row in server.rows if row["finish_reason"] != "error"]


def test_padded_layout_batches_equal_collate_topk_of_the_same_rows(
    client: tc.Client, server: ShardServerDouble
) -> None:
    dataset = tc.ShardDataset(job=JOB_ID, client=client, shuffle=False, layout="padded", rows_per_batch=4, pad_id=-1,
                              batch_size=3)  # batches span record batches and shards
    batches = list(dataset)
    rows = kept_rows(server)  # failed rows are dropped before batching: every batch is full but the last
    assert [len(batch["custom_id"]) for batch in batches] == [4, 4, 4, 4]  # 17 rows, one failed
    for index, batch in enumerate(batches):
        expected = tc.collate_topk(rows[4 * index:4 * index + 4], pad_id=-1)
        assert batch["custom_id"] == expected["custom_id"]
        for name, tensor in expected.items():
            if name != "custom_id":
                assert batch[name].dtype == tensor.dtype and torch.equal(batch[name], tensor), name


def assert_packed_layout(batch: dict[str, Any], rows_by_id: dict[str, dict[str, Any]], pad_id: int = 0) -> None:
    """Every sequence of the packed batch is its row's prompt + completion, with its targets."""
    cu, ids, positions = batch["cu_seqlens"].tolist(), batch["input_ids"][0].tolist(), batch["position_ids"][0]
    assert batch["cu_seqlens"].dtype == torch.int32 and len(cu) == len(batch["custom_id"]) + 1 and cu[0] == 0
    assert batch["input_ids"].shape == (1, cu[-1]) and batch["max_seqlen"] == max(b - a for a, b in zip(cu, cu[1:]))
    targets = 0
    for i, custom_id in enumerate(batch["custom_id"]):
        row = rows_by_id[custom_id]
        p, c = len(row["prompt_token_ids"]), len(row["completion_token_ids"])
        start, end = cu[i], cu[i + 1]
        assert ids[start:end] == row["prompt_token_ids"] + row["completion_token_ids"]
        assert positions[start:end].tolist() == list(range(end - start))
        mine = (batch["target_sequence"] == i).nonzero().flatten()
        assert batch["target_positions"][mine].tolist() == list(range(start + p, start + p + c))
        assert batch["top_token_ids"][mine].tolist() == row["top_token_ids"]
        assert batch["top_logprobs"][mine].tolist() == row["top_logprobs"]
        assert batch["token_logprobs"][mine].tolist() == row["token_logprobs"]
        targets += c
    assert batch["top_token_ids"].shape == (targets, K) and batch["top_logprobs"].dtype == torch.float32
    # The shift: each target is the teacher's view of the token at its own position.
    assert torch.equal(batch["top_token_ids"][:, 0], batch["input_ids"][0, batch["target_positions"]])


def test_packed_layout_holds_each_sequence_and_its_targets(client: tc.Client, server: ShardServerDouble) -> None:
    dataset = tc.ShardDataset(job=JOB_ID, client=client, shuffle=False, layout="packed", tokens_per_batch=16)
    batches = list(dataset)
    rows_by_id = {row["custom_id"]: row for row in server.rows}
    assert [i for batch in batches for i in batch["custom_id"]] == [row["custom_id"] for row in kept_rows(server)]
    for batch in batches:
        assert batch["input_ids"].shape[1] <= 16 or len(batch["custom_id"]) == 1
        assert_packed_layout(batch, rows_by_id)


def test_packed_batches_hold_every_row_once_across_ranks_and_workers(
    client: tc.Client, server: ShardServerDouble
) -> None:
    """Small budgets put pack boundaries inside shards and record batches: no row is lost or repeated."""
    rows_by_id = {row["custom_id"]: row for row in server.rows}
    for budget, shuffle_buffer in ((9, 0), (20, 3)):
        seen: list[str] = []
        for rank in (0, 1):
            dataset = tc.ShardDataset(job=JOB_ID, client=client, rank=rank, world_size=2, seed=5, layout="packed",
                                      tokens_per_batch=budget, shuffle_buffer=shuffle_buffer, batch_size=2)
            for batch in DataLoader(dataset, batch_size=None, num_workers=2):
                assert_packed_layout(batch, rows_by_id)
                seen += batch["custom_id"]
        assert Counter(seen) == Counter(row["custom_id"] for row in kept_rows(server)), budget


def test_pack_boundaries_cut_greedily_and_put_a_long_row_alone() -> None:
    from teachercache.layouts import pack_boundaries

    lengths = np.array([3, 4, 2, 9, 1, 1])
    assert pack_boundaries(lengths, 8) == [2, 3, 4]  # [3,4] [2] [9 alone]; [1,1] wait for more rows
    assert pack_boundaries(lengths, 100) == []
    assert pack_boundaries(np.array([10, 10]), 5) == [1, 2]  # a row over the budget can share with none


def test_packed_layout_pads_a_ragged_top_k_with_minus_infinity() -> None:
    from teachercache.layouts import packed_batch, table_from_rows

    row = {"custom_id": "r", "prompt_token_ids": [5], "completion_token_ids": [6, 7], "token_logprobs": [-1.0, -2.0],
           "top_token_ids": [[6, 9], [7]], "top_logprobs": [[-1.0, -3.0], [-2.0]], "finish_reason": "stop"}
    batch = packed_batch(table_from_rows([row, {**row, "custom_id": "failed", "finish_reason": "error"}]))
    assert batch["custom_id"] == ["r"] and batch["target_positions"].tolist() == [1, 2]
    assert batch["top_token_ids"].tolist() == [[6, 9], [7, 0]]
    assert batch["top_logprobs"].tolist() == [[-1.0, -3.0], [-2.0, float("-inf")]]


def test_local_shard_files_need_no_service(server: ShardServerDouble) -> None:
    folder_rows = [key(row) for row in tc.ShardDataset([server.folder], shuffle=False)]
    assert folder_rows == [key(row) for row in server.rows]
    files = sorted(server.folder.glob("*.parquet"))
    batches = list(tc.ShardDataset(files, layout="packed", shuffle=False))
    assert [i for batch in batches for i in batch["custom_id"]] == [row["custom_id"] for row in kept_rows(server)]


def test_shuffle_buffer_moves_rows_and_keeps_each_once(client: tc.Client, server: ShardServerDouble) -> None:
    plain = [key(row) for row in tc.ShardDataset(job=JOB_ID, client=client, shuffle=False)]
    shuffled = [key(row) for row in tc.ShardDataset(job=JOB_ID, client=client, shuffle=False, shuffle_buffer=5,
                                                     batch_size=2)]
    assert sorted(shuffled) == sorted(plain) and shuffled != plain


def test_an_unknown_layout_is_refused(client: tc.Client) -> None:
    with pytest.raises(ValueError, match="layout"):
        tc.ShardDataset(job=JOB_ID, client=client, layout="ragged")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_batches_from_dataloader_workers_are_the_same_tensors_in_one_shared_buffer(
    client: tc.Client, server: ShardServerDouble, layout: str
) -> None:
    """A worker's batch crosses as views of one buffer (one transfer, not one per tensor): the
    tensors, dtypes and shapes of the same batch made in the training process."""
    options: dict[str, Any] = {"rows_per_batch": 3} if layout == "padded" else {"tokens_per_batch": 16}
    dataset = tc.ShardDataset(job=JOB_ID, client=client, shuffle=False, layout=layout, **options)
    here = list(dataset)
    there = list(DataLoader(dataset, batch_size=None, num_workers=1))
    assert len(there) == len(here) > 1
    for mine, theirs in zip(here, there, strict=True):
        assert mine.keys() == theirs.keys()
        tensors = [name for name, value in mine.items() if isinstance(value, torch.Tensor)]
        assert len(tensors) >= 5
        for name in tensors:
            assert theirs[name].dtype == mine[name].dtype and theirs[name].shape == mine[name].shape, name
            assert torch.equal(theirs[name], mine[name]), name
        assert len({theirs[name].untyped_storage().data_ptr() for name in tensors}) == 1
        assert mine["custom_id"] == theirs["custom_id"]


def test_one_shared_buffer_keeps_each_tensor_and_its_alignment() -> None:
    from teachercache.dataset import in_one_shared_buffer

    batch = {"a": torch.arange(7, dtype=torch.int64).view(7, 1), "b": torch.tensor([True, False, True]),
             "c": torch.rand(2, 3, 5), "empty": torch.zeros(0, 4, dtype=torch.int64), "custom_id": ["x"]}
    out = in_one_shared_buffer(batch)
    for name in ("a", "b", "c", "empty"):
        assert out[name].dtype == batch[name].dtype and torch.equal(out[name], batch[name])
        assert out[name].storage_offset() * out[name].element_size() % 64 == 0
    assert out["a"].untyped_storage().data_ptr() == out["c"].untyped_storage().data_ptr()
    assert out["c"].is_shared() and out["custom_id"] == ["x"]
    batch["a"][0] = 99  # a copy: the original batch stays the caller's
    assert out["a"][0].item() == 0
