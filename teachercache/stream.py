"""Read a job's shards straight from the service, without downloading them first.

Each shard is opened as a seekable file whose reads are HTTP ``Range`` requests, and
handed to ``pyarrow.parquet.ParquetFile``: only the footer and the column chunks asked
for cross the network, so ``columns=[...]`` saves bandwidth, not just memory.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from teachercache.client import Client
from teachercache.errors import TransportError
from teachercache.shard_format import open_shard
from teachercache.soft_labels import decode, encoding_of, stored_columns

DEFAULT_BATCH_SIZE = 1024
_TOTAL_SIZE = re.compile(r"/(\d+)$")

# A job id, a shard URL, a manifest entry, or a local shard file (or folder of them) as a Path.
ShardRef = str | dict[str, Any] | os.PathLike[str]


class HTTPRangeFile(io.RawIOBase):
    """A read-only, seekable file over one URL; every read is a ``Range`` request.

    ``size`` comes from the manifest's ``bytes`` when given, otherwise from a one-byte
    range probe's ``Content-Range``: a ranged GET, not a HEAD, so the probe also works on a
    presigned object-store URL, which is signed for GET only. Requests go
    through ``client``, so they are authenticated and retried like every other call.
    """

    def __init__(self, client: Client, url: str, size: int | None = None) -> None:
        super().__init__()
        self.client = client
        self.url = url
        self.size = size if size is not None else self._probe_size()
        self._position = 0
        self._blocks: list[tuple[int, bytes]] = []  # prefetched (start, bytes), see prefetch()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def read(self, size: int = -1) -> bytes:
        # Overridden (not just readinto) to hand pyarrow the response bytes without a copy.
        end = self.size if size is None or size < 0 else min(self._position + size, self.size)
        if end <= self._position:
            return b""  # at or past the end of the file
        data = self._prefetched(self._position, end)
        if data is None:
            data = self._fetch(self._position, end)
        self._position += len(data)
        return data

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """Fetch these [start, end) spans now and answer the reads inside them from memory (see
        fetch_spans and use_blocks; prefetch is both at once)."""
        self.use_blocks(self.fetch_spans(spans))

    def fetch_spans(self, spans: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        """The bytes of these [start, end) spans, one request each. pyarrow reads a row group's
        column chunks one request each; a span covering them all costs one round trip instead
        of one per column. Safe to call from another thread while this file is being read."""
        return [(start, self._fetch(start, end)) for start, end in spans]

    def use_blocks(self, blocks: list[tuple[int, bytes]]) -> None:
        """Answer reads that fall inside these (start, bytes) blocks from memory, forgetting the
        previous ones."""
        self._blocks = blocks

    def _prefetched(self, start: int, end: int) -> bytes | None:
        for block_start, block in self._blocks:
            if block_start <= start and end <= block_start + len(block):
                return block[start - block_start:end - block_start]
        return None

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file."""
        response = self.client._request("GET", self.url, headers=_range_headers(f"bytes={start}-{end - 1}"))
        if response.status_code == 206:
            return response.content
        # A server that ignores Range sends the whole file: still correct, just wasteful.
        return response.content[start:end]

    def _probe_size(self) -> int:
        response = self.client._request("GET", self.url, headers=_range_headers("bytes=0-0"))
        match = _TOTAL_SIZE.search(response.headers.get("content-range", ""))
        if match:
            return int(match.group(1))
        if response.status_code == 200:
            return len(response.content)
        raise TransportError(f"{self.url}: cannot tell the file's size (no Content-Range)")


def _range_headers(byte_range: str) -> dict[str, str]:
    # Offsets index the file itself, so no content-encoding may stand in between.
    return {"Range": byte_range, "Accept-Encoding": "identity"}


def stream(
    job_or_urls: ShardRef | Iterable[ShardRef],
    *,
    client: Client | None = None,
    base_url: str | None = None,
    columns: list[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Iterator[pa.RecordBatch]:
    """Yield the record batches of a job's shards, in shard order, read over HTTP.

    ``job_or_urls``: a job id, a job object, one shard URL or manifest entry, or a list
    of URLs / manifest entries. A string that starts with ``http://``, ``https://`` or
    ``/`` is a URL; any other string is a job id. ``columns`` projects columns;
    ``batch_size`` is the most rows per batch. Without ``client`` one is made from
    ``base_url`` (or ``$TEACHERCACHE_URL``) and closed at the end.
    """
    owned = client is None
    client = client or Client(base_url)
    try:
        for shard in resolve_shards(job_or_urls, client):
            yield from read_shard(client, shard, columns, batch_size)
    finally:
        if owned:
            client.close()


def resolve_shards(job_or_urls: ShardRef | Iterable[ShardRef], client: Client | None) -> list[dict[str, Any]]:
    """Manifest entries (``url``, maybe ``bytes``; or a local file's ``path``) for whatever stream()
    was given. ``client`` asks the service for a job's manifest; local files need none."""
    if isinstance(job_or_urls, str) and not is_url(job_or_urls):
        return _service(client).shards(job_or_urls)
    if isinstance(job_or_urls, dict) and "url" not in job_or_urls and "path" not in job_or_urls:
        # A job object: its embedded manifest once finished, otherwise ask the service.
        manifest: list[dict[str, Any]] | None = job_or_urls.get("shards")
        return manifest or _service(client).shards(job_or_urls)
    if isinstance(job_or_urls, (str, dict, os.PathLike)):
        job_or_urls = [job_or_urls]
    return [entry for item in job_or_urls for entry in _entries(item)]


def _entries(item: str | dict[str, Any] | os.PathLike[str]) -> list[dict[str, Any]]:
    """Manifest entries for one reference: a local folder stands for its shard files, in name order."""
    if isinstance(item, str):
        return [{"url": item}]
    if isinstance(item, os.PathLike):
        path = os.fspath(item)
        if os.path.isdir(path):
            return [{"path": os.path.join(path, name)} for name in sorted(os.listdir(path)) if name.endswith(".parquet")]
        return [{"path": path}]
    return [item]


def _service(client: Client | None) -> Client:
    if client is None:
        raise TypeError("a job's shards are listed by the service: pass a client")
    return client


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://", "/"))


def read_shard(
    client: Client | None,
    shard: dict[str, Any],
    columns: list[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Iterator[pa.RecordBatch]:
    """The record batches of one shard (a manifest entry with ``url`` and maybe ``bytes``, or a
    local file's ``path``).

    Each row group's needed column chunks are fetched as merged spans (one range request
    each, usually one per row group), the next row group's while this one decodes, so memory
    stays bounded by two row groups. Arrow's own pre_buffer stays off: its reads run on
    Arrow's I/O threads, which call back into Python and can abort the interpreter at exit
    when one is still releasing the file. The shard's schema version is checked from its
    footer before any row is read (ShardFormatError for one this client does not know), and
    its soft labels are decoded from whatever encoding the job chose into the float32 columns.
    """
    if "path" in shard:
        parquet, _ = open_shard(shard["path"])
        yield from _decoded_batches(parquet, shard["path"], columns, batch_size)
        return
    # One thread fetches row group g + 1 while this one decodes row group g: the round trip and
    # the transfer overlap the decoding (both release the GIL). At most two row groups in memory.
    with HTTPRangeFile(_service(client), shard["url"], shard.get("bytes")) as file, \
            ThreadPoolExecutor(1, thread_name_prefix="teachercache-prefetch") as fetcher:
        parquet, _ = open_shard(file, shard["url"], pre_buffer=False)
        encoding = encoding_of(parquet.schema_arrow.metadata, shard["url"])
        stored = stored_columns(columns, encoding)
        spans = [column_spans(parquet.metadata.row_group(g), stored) for g in range(parquet.metadata.num_row_groups)]
        upcoming = fetcher.submit(file.fetch_spans, spans[0]) if spans else None
        for group in range(len(spans)):
            file.use_blocks(upcoming.result() if upcoming else [])
            upcoming = fetcher.submit(file.fetch_spans, spans[group + 1]) if group + 1 < len(spans) else None
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group], columns=stored):
                yield decode(batch, encoding, shard["url"], columns)
        file.use_blocks([])


# Column chunks closer than this are fetched in one span: a round trip costs more than the gap's bytes.
SPAN_GAP = 1 << 20


def column_spans(row_group: pq.RowGroupMetaData, columns: list[str] | None) -> list[tuple[int, int]]:
    """The byte spans [start, end) of a row group's column chunks for these top-level columns
    (all if None), neighbours closer than SPAN_GAP merged."""
    chunks = []
    for index in range(row_group.num_columns):
        chunk = row_group.column(index)
        if columns is not None and chunk.path_in_schema.split(".")[0] not in columns:
            continue
        start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
        chunks.append((start, start + chunk.total_compressed_size))
    spans: list[tuple[int, int]] = []
    for start, end in sorted(chunks):
        if spans and start - spans[-1][1] <= SPAN_GAP:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def _decoded_batches(parquet: pq.ParquetFile, where: str, columns: list[str] | None,
                     batch_size: int) -> Iterator[pa.RecordBatch]:
    encoding = encoding_of(parquet.schema_arrow.metadata, where)
    for batch in parquet.iter_batches(batch_size=batch_size, columns=stored_columns(columns, encoding)):
        yield decode(batch, encoding, where, columns)
