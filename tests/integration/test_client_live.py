"""The client package against the live service: the real app on a real Postgres, served by
uvicorn on 127.0.0.1, its worker loop on the scripted engine. Client, CLI, resumable
downloads, HF ``datasets`` reading the shard URLs as they are, and ShardDataset split over
2 ranks x 2 DataLoader workers. test_client_unit.py and test_loader.py hold the same
client to contract doubles; here nothing in between is imitated."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uvicorn
from typer.testing import CliRunner

import teachercache as tc
from teachercache import cli
from workers.scripted_engine import ScriptedEngine

# Local storage, and an S3 bucket (moto on loopback) with downloads by presigned redirect or
# proxied through the API: the client, the loaders and HF datasets must work against each.
ALL_STORAGES = pytest.mark.parametrize("storage_uri, storage_download",
                                       [("local", "proxy"), ("s3", "redirect"), ("s3", "proxy")],
                                       indirect=True, ids=["local", "s3-redirect", "s3-proxy"])
SHARD_ROWS = 5  # small shards, so a job of a few dozen rows has enough for 4 readers
NO_SLEEP = tc.RetryPolicy(sleep=lambda seconds: None)


@contextmanager
def serve_on_loopback(app: Any, timeout: float = 30) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 (a free port) in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before the thread starts: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"shard_rows": SHARD_ROWS})


@pytest.fixture
def live_url(rt, api_key, monkeypatch) -> Iterator[str]:
    """The app on a loopback port; clients find tenant alpha's key in TEACHERCACHE_API_KEY."""
    from service.http.app import create_app

    monkeypatch.setenv("TEACHERCACHE_API_KEY", api_key)
    with serve_on_loopback(create_app(rt)) as url:
        yield url


@pytest.fixture
def client(live_url: str) -> Iterator[tc.Client]:
    with tc.Client(live_url, retry=NO_SLEEP) as client:
        yield client


@pytest.fixture
def scripted_worker(start_worker):
    return start_worker(ScriptedEngine())


def requests_for(count: int, tag: str = "q") -> list[dict[str, Any]]:
    """Token-id prompts (no tokenizer in the way); every third one a text prompt."""
    return [
        {"custom_id": f"{tag}{i}", "prompt": f"Say {i}."}
        if i % 3 == 0
        else {"custom_id": f"{tag}{i}", "prompt_token_ids": [1, 2, 3, 100 + i]}
        for i in range(count)
    ]


def finished_job(client: tc.Client, count: int, **submit: Any) -> dict[str, Any]:
    job = client.submit(requests_for(count), top_logprobs=5, sampling={"max_tokens": 8}, **submit)
    return client.wait(job, poll_interval=0.1, timeout=60, raise_on_failure=True)


def read_rows(paths: list[Path]) -> list[dict[str, Any]]:
    return pa.concat_tables([pq.read_table(path) for path in paths]).to_pylist()


def row_key(row: dict[str, Any]) -> tuple[int, int]:
    return row["request_index"], row["sample_index"]


# -- Client: submit, wait, download, stream -----------------------------------------


@ALL_STORAGES
def test_submit_inline_wait_download_and_stream(
    client: tc.Client, scripted_worker, tmp_path: Path
) -> None:
    job = finished_job(client, 12)
    assert job["status"] == "succeeded" and job["counts"]["completed"] == 12
    files = client.download(job, tmp_path / "out")
    manifest = client.shards(job)
    assert len(files) == len(manifest) == 3  # 12 rows in shards of 5
    assert [hashlib.sha256(path.read_bytes()).hexdigest() for path in files] == [s["sha256"] for s in manifest]
    rows = read_rows(files)
    assert [row["custom_id"] for row in rows] == [f"q{i}" for i in range(12)]
    assert all(len(row["completion_token_ids"]) == 8 and len(row["top_token_ids"][0]) == 5 for row in rows)
    streamed = pa.Table.from_batches(list(tc.stream(job["id"], client=client))).to_pylist()
    assert streamed == rows


def test_submit_a_jsonl_file_then_the_same_file_is_answered_from_the_cache(
    client: tc.Client, scripted_worker, tmp_path: Path
) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(request) + "\n" for request in requests_for(7)))
    first = client.wait(client.submit(jsonl_path=path, top_logprobs=5), poll_interval=0.1, timeout=60)
    assert first["status"] == "succeeded" and first["counts"]["completed"] == 7
    again = client.wait(client.submit(jsonl_path=path, top_logprobs=5), poll_interval=0.1, timeout=60)
    assert again["counts"]["cached"] == 7 and again["id"] != first["id"]
    downloaded = [read_rows(client.download(job, tmp_path / job["id"])) for job in (first, again)]
    without_flag = [[{**row, "cached": None} for row in rows] for rows in downloaded]
    assert without_flag[0] == without_flag[1]
    assert all(row["cached"] for row in downloaded[1])


# -- resumable downloads against the real shard route ---------------------------------


class RecordingTransport(httpx.BaseTransport):
    """Real HTTP over loopback; records each shard request's Range header and can cut the
    first shard body half-way, as a dropped connection would."""

    def __init__(self, cut_first_body: bool = False) -> None:
        self._inner = httpx.HTTPTransport()
        self.cut_pending = cut_first_body
        self.shard_ranges: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if "/v1/shards/" not in request.url.path:
            return response
        self.shard_ranges.append(request.headers.get("range"))
        if not self.cut_pending:
            return response
        self.cut_pending = False
        half = int(response.headers["content-length"]) // 2
        return httpx.Response(response.status_code, headers=response.headers, stream=HalfThenDrop(response, half))

    def close(self) -> None:
        self._inner.close()


class HalfThenDrop(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response, limit: int) -> None:
        self._response, self._limit = response, limit

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for chunk in self._response.stream:
            piece = chunk[: self._limit - sent]
            sent += len(piece)
            yield piece
            if sent >= self._limit:
                break
        self._response.close()
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.mark.parametrize("storage_uri, storage_download", [("local", "proxy"), ("s3", "proxy")], indirect=True,
                         ids=["local", "s3-proxy"])  # redirected, the API's own body is an empty 307
def test_download_cut_half_way_resumes_with_range_to_the_right_sha256(
    client: tc.Client, live_url: str, scripted_worker, tmp_path: Path
) -> None:
    job = finished_job(client, 4)
    [shard] = client.shards(job)
    transport = RecordingTransport(cut_first_body=True)
    with tc.Client(live_url, transport=transport, retry=NO_SLEEP) as cutting:
        [path] = cutting.download(job, tmp_path / "out")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
    assert transport.shard_ranges == [None, f"bytes={shard['bytes'] // 2}-"]
    assert not list(path.parent.glob("*.part"))


def test_download_resumes_a_part_file_left_by_an_earlier_run(
    client: tc.Client, live_url: str, scripted_worker, tmp_path: Path
) -> None:
    job = finished_job(client, 4)
    [shard] = client.shards(job)
    whole = client._request("GET", shard["url"]).content
    out = tmp_path / "out"
    [first] = client.download(job, out)
    first.unlink()
    # What an interrupted run leaves: the first half under the .part name.
    first.with_name(first.name + ".part").write_bytes(whole[: len(whole) // 2])
    transport = RecordingTransport()
    with tc.Client(live_url, transport=transport, retry=NO_SLEEP) as resuming:
        [path] = resuming.download(job, out)
    assert path.read_bytes() == whole and hashlib.sha256(whole).hexdigest() == shard["sha256"]
    assert transport.shard_ranges == [f"bytes={len(whole) // 2}-"]


# -- the CLI on loopback --------------------------------------------------------------


def run_cli(live_url: str, *args: str) -> Any:
    result = CliRunner().invoke(cli.app, [*args, "--json"], env={"TEACHERCACHE_URL": live_url})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_submit_wait_out_then_status_list_download(live_url: str, scripted_worker, tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(request) + "\n" for request in requests_for(6)))
    options = ["--top-logprobs", "5", "--max-tokens", "8", "--wait", "--out", str(tmp_path / "a")]
    submitted = run_cli(live_url, "submit", str(path), *options)
    job = submitted["job"]
    assert job["status"] == "succeeded" and len(submitted["files"]) == 2  # 6 rows in shards of 5
    assert [row["custom_id"] for row in read_rows([Path(f) for f in submitted["files"]])] == [
        f"q{i}" for i in range(6)
    ]
    assert run_cli(live_url, "status", job["id"])["counts"]["completed"] == 6
    assert [listed["id"] for listed in run_cli(live_url, "list")["data"]] == [job["id"]]
    files = run_cli(live_url, "download", job["id"], "--out", str(tmp_path / "b"))
    assert [Path(f).read_bytes() for f in files] == [Path(f).read_bytes() for f in submitted["files"]]


def test_cli_status_watch_redraws_until_the_job_ends(live_url: str, client: tc.Client, start_worker) -> None:
    job = client.submit(requests_for(40), top_logprobs=2, sampling={"max_tokens": 6})
    start_worker(ScriptedEngine(step_delay_s=0.03, tokens_per_step=1), max_inflight=4)
    result = CliRunner().invoke(cli.app, ["status", job["id"], "--watch", "--poll-interval", "0.1", "--json"],
                                env={"TEACHERCACHE_URL": live_url})
    assert result.exit_code == 0, result.output
    final = json.loads(result.stdout)
    assert final["status"] == "succeeded" and final["counts"]["completed"] == 40
    frames = result.stderr.count(f"job {job['id']}")
    assert frames >= 1 and "succeeded" in result.stderr and "40/40" in result.stderr
    assert "req/s" in result.stderr and "ETA" in result.stderr


# -- HF datasets reads the shard URLs as they are --------------------------------------


@ALL_STORAGES
def test_hf_datasets_streams_the_shard_urls(
    client: tc.Client, scripted_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no trace in the user's cache
    from datasets import load_dataset

    job = finished_job(client, 12)
    urls = [shard["url"] for shard in job["shards"]]
    # Shard URLs need the key too: fsspec's HTTP filesystem sends these headers with every request.
    auth = {"headers": {"Authorization": f"Bearer {os.environ['TEACHERCACHE_API_KEY']}"}}
    streamed = load_dataset("parquet", data_files=urls, split="train", streaming=True, storage_options=auth)
    assert list(streamed) == read_rows(client.download(job, tmp_path / "out"))


@ALL_STORAGES
def test_polars_scans_the_shard_urls_through_a_pyarrow_dataset(client: tc.Client, scripted_worker,
                                                                tmp_path: Path) -> None:
    """Polars' own HTTP reader sends no custom headers (pola-rs/polars#17197), so the key goes
    with fsspec's HTTP filesystem under a pyarrow dataset, which Polars scans lazily."""
    import fsspec
    import polars as pl
    import pyarrow.dataset as ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    job = finished_job(client, 12)
    http = fsspec.filesystem("http", headers={"Authorization": f"Bearer {os.environ['TEACHERCACHE_API_KEY']}"})
    shards = ds.dataset([shard["url"] for shard in job["shards"]], format="parquet",
                        filesystem=PyFileSystem(FSSpecHandler(http)))
    columns = ["custom_id", "completion_token_ids", "top_logprobs"]
    frame = pl.scan_pyarrow_dataset(shards).select(columns).collect()
    expected = read_rows(client.download(job, tmp_path / "out"))
    assert frame.to_dicts() == [{name: row[name] for name in columns} for row in expected]


@ALL_STORAGES
def test_shard_url_answers_head_with_size_and_etag(client: tc.Client, scripted_worker) -> None:
    # What fsspec (under datasets, pandas, polars) asks first; without it, a GET of the whole file.
    shard = finished_job(client, 3)["shards"][0]
    response = httpx.head(shard["url"], headers={"Authorization": f"Bearer {os.environ['TEACHERCACHE_API_KEY']}"})
    assert httpx.head(shard["url"]).status_code == 401
    assert response.status_code == 200 and response.content == b""
    assert int(response.headers["content-length"]) == shard["bytes"]
    assert response.headers["etag"] == f'"{shard["sha256"]}"'
    assert response.headers["accept-ranges"] == "bytes"


# -- ShardDataset over 2 ranks x 2 DataLoader workers ------------------------------------


@ALL_STORAGES
def test_two_ranks_with_two_workers_each_read_every_row_exactly_once(
    client: tc.Client, scripted_worker, tmp_path: Path
) -> None:
    from torch.utils.data import DataLoader

    job = finished_job(client, 23)
    assert len(job["shards"]) == 5
    expected = Counter(row_key(row) for row in read_rows(client.download(job, tmp_path / "out")))
    per_rank = []
    for rank in (0, 1):
        dataset = tc.ShardDataset(job=job["id"], client=client, rank=rank, world_size=2, seed=1)
        per_rank.append([row_key(row) for row in DataLoader(dataset, batch_size=None, num_workers=2)])
    assert Counter(per_rank[0] + per_rank[1]) == expected
    assert sum(expected.values()) == 23 and all(per_rank)


@ALL_STORAGES
def test_packed_batches_over_two_ranks_with_two_workers_hold_every_row_once(
    client: tc.Client, scripted_worker, tmp_path: Path
) -> None:
    """The packed layout over the live service: small budgets cut packs inside shards; each row is in
    one pack, whole (its sequence and its targets), across ranks and workers."""
    from torch.utils.data import DataLoader

    job = finished_job(client, 23)
    rows = {row["custom_id"]: row for row in read_rows(client.download(job, tmp_path / "out"))}
    seen = []
    for rank in (0, 1):
        dataset = tc.ShardDataset(job=job["id"], client=client, rank=rank, world_size=2, seed=1, layout="packed",
                                  tokens_per_batch=40, shuffle_buffer=4)
        for batch in DataLoader(dataset, batch_size=None, num_workers=2):
            cu = batch["cu_seqlens"].tolist()
            for i, custom_id in enumerate(batch["custom_id"]):
                row = rows[custom_id]
                assert batch["input_ids"][0, cu[i]:cu[i + 1]].tolist() == (
                    row["prompt_token_ids"] + row["completion_token_ids"])
                mine = batch["target_sequence"] == i
                assert batch["top_token_ids"][mine].tolist() == row["top_token_ids"]
            seen += batch["custom_id"]
    assert Counter(seen) == Counter(custom_id for custom_id, row in rows.items() if row["finish_reason"] != "error")
