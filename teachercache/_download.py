"""The bookkeeping of a resumable, verified shard download, shared by Client and AsyncClient.

A shard is written to ``<name>.part``; a later attempt that finds a ``.part`` asks for the
rest with ``Range: bytes=<have>-`` (and ``If-Range`` with the shard's ETag, so a changed
file comes back whole). Only a file whose sha256 matches the manifest is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import httpx

from teachercache.errors import IntegrityError, TransportError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_HASH_CHUNK = 1024 * 1024


def shard_file_names(shards: list[dict[str, Any]]) -> list[str]:
    """Local file names: the URL's own ``*.parquet`` name, or ``shard-00000.parquet``.

    Index-based names are used for all shards when URL names are missing or collide,
    so two shards can never overwrite each other.
    """
    names = [_url_file_name(shard["url"]) for shard in shards]
    if all(names) and len(set(names)) == len(names):
        return names  # type: ignore[return-value]
    return [f"shard-{int(shard['index']):05d}.parquet" for shard in shards]


def _url_file_name(url: str) -> str | None:
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    safe = name.endswith(".parquet") and name != ".parquet" and "\\" not in name
    return name if safe else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardTarget:
    """One manifest entry on its way to ``path``: what to fetch and what it must be."""

    url: str
    path: Path
    sha256: str | None
    size: int | None

    @classmethod
    def from_manifest(cls, shard: dict[str, Any], path: Path) -> ShardTarget:
        size = shard.get("bytes")
        return cls(shard["url"], path, shard.get("sha256"), int(size) if size is not None else None)

    @property
    def part(self) -> Path:
        return self.path.with_name(self.path.name + ".part")

    def already_done(self) -> bool:
        """A finished file from an earlier run, verified (so download() is re-runnable)."""
        if not self.path.exists() or self.sha256 is None:
            return False
        return sha256_of(self.path) == self.sha256

    def resume_offset(self) -> int:
        """Bytes already on disk; a .part longer than the shard is stale and dropped."""
        have = self.part.stat().st_size if self.part.exists() else 0
        if self.size is not None and have > self.size:
            self.part.unlink()
            return 0
        return have

    def is_complete_on_disk(self, offset: int) -> bool:
        return self.size is not None and offset == self.size

    def request_headers(self, offset: int) -> dict[str, str]:
        if offset == 0:
            return {}
        headers = {"Range": f"bytes={offset}-"}
        if self.sha256:
            headers["If-Range"] = f'"{self.sha256}"'  # the contract's ETag is the quoted sha256
        return headers

    def open_for(self, response: httpx.Response, offset: int) -> IO[bytes]:
        """The .part file, positioned where this response's bytes belong."""
        self._learn_from_headers(response)
        if response.status_code == 206 and offset > 0 and _range_start(response) == offset:
            return open(self.part, "ab")
        if response.status_code == 206:
            raise TransportError(
                f"{self.url}: unexpected Content-Range {response.headers.get('content-range')!r}"
            )
        # A 200 is the whole file: the server ignored the Range, or the shard changed.
        return open(self.part, "wb")

    def restart(self) -> None:
        """Forget the partial file (the server said our range does not fit the shard)."""
        self.part.unlink(missing_ok=True)

    def check_length(self) -> None:
        """A body shorter than promised is a dropped connection: worth another attempt."""
        have = self.part.stat().st_size
        if self.size is not None and have < self.size:
            raise TransportError(f"{self.url}: body cut short at {have} of {self.size} bytes")

    def finish(self) -> Path:
        """Verify the sha256 and move the .part into place; a mismatch deletes it."""
        if self.sha256 is not None:
            actual = sha256_of(self.part)
            if actual != self.sha256:
                self.part.unlink(missing_ok=True)
                raise IntegrityError(os.fspath(self.path), self.sha256, actual)
        os.replace(self.part, self.path)
        return self.path

    def _learn_from_headers(self, response: httpx.Response) -> None:
        # Manifests carry both; headers fill in for a URL given without its manifest entry.
        if self.sha256 is None:
            self.sha256 = _sha256_from_headers(response.headers)
        if self.size is None:
            self.size = _total_size(response)


def _range_start(response: httpx.Response) -> int | None:
    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
    return int(match.group(1)) if match else None


def _total_size(response: httpx.Response) -> int | None:
    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
    if match and match.group(3) != "*":
        return int(match.group(3))
    length = response.headers.get("content-length")
    return int(length) if response.status_code == 200 and length is not None else None


def _sha256_from_headers(headers: httpx.Headers) -> str | None:
    for candidate in (headers.get("x-content-sha256"), headers.get("etag")):
        value = (candidate or "").strip('"').lower()
        if _HEX64.match(value):
            return value
    return None
