"""Client and AsyncClient: the service's HTTP API as Python calls.

Both take ``base_url`` (default ``$TEACHERCACHE_URL`` or http://127.0.0.1:8080),
``api_key`` (default ``$TEACHERCACHE_API_KEY``; sent as ``Authorization: Bearer``),
``timeout`` and an httpx ``transport``, so tests can drive an ASGI app in process::

    client = AsyncClient("http://test", transport=httpx.ASGITransport(app))

Every call retries transient failures (connect/read errors, 429, 502/503/504) with
jittered exponential backoff, honouring ``Retry-After`` (see :class:`RetryPolicy`), and
raises the exceptions of :mod:`teachercache.errors` otherwise. Methods that take a job
accept its id or the job object itself.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from teachercache import _http, online_format
from teachercache._download import ShardTarget, shard_file_names
from teachercache._jsonl import aiter_submit_body, is_large, iter_submit_body, validate_jsonl
from teachercache._progress import WaitProgress, wants_progress
from teachercache._retry import RetryPolicy, async_retrying, retrying
from teachercache._states import FINISHED, UNSUCCESSFUL
from teachercache.errors import JobFailedError, NotFoundError, TransportError, WaitTimeoutError, error_from_response
from teachercache.online_format import Scores

Job = dict[str, Any]
JobRef = str | Job
PathLike = str | os.PathLike[str]
DEFAULT_TIMEOUT = 30.0
# Shards are compared byte for byte with their sha256: no content-encoding in between.
_IDENTITY = {"Accept-Encoding": "identity"}


def job_id_of(job: JobRef) -> str:
    return job if isinstance(job, str) else str(job["id"])


def _job_path(job: JobRef, suffix: str = "") -> str:
    return f"/v1/jobs/{quote(job_id_of(job), safe='')}{suffix}"


def _targets(shards: list[dict[str, Any]], out_dir: PathLike) -> list[ShardTarget]:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    names = shard_file_names(shards)
    return [
        ShardTarget.from_manifest(shard, folder / name) for shard, name in zip(shards, names, strict=True)
    ]


def _finished(job: Job, raise_on_failure: bool) -> Job:
    if raise_on_failure and job.get("status") in UNSUCCESSFUL:
        raise JobFailedError(job)
    return job


class _Deadline:
    """When wait() gives up, and how long it may still sleep."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end

    def nap(self, poll_interval: float) -> float:
        if self._end is None:
            return poll_interval
        return max(0.0, min(poll_interval, self._end - time.monotonic()))


class Client:
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_url = _http.resolve_base_url(base_url)
        self.retry = retry or RetryPolicy()
        # What a DataLoader worker needs to build its own client (see ShardDataset).
        self._options = {
            "base_url": self.base_url,
            "api_key": api_key,
            "timeout": timeout,
            "transport": transport,
            "retry": retry,
        }
        self._http = httpx.Client(transport=transport, **_http.http_options(self.base_url, api_key, timeout))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the API ---------------------------------------------------------------------

    def teachers(self) -> builtins.list[dict[str, Any]]:
        """The teachers some worker can serve (name, model, revision, limits, tokenizer hash)."""
        return _http.unwrap_list(self._json("GET", "/v1/teachers"), "teachers")

    def submit(
        self,
        requests: Iterable[dict[str, Any]] | None = None,
        *,
        jsonl_path: PathLike | None = None,
        teacher: str | None = None,
        mode: str = "generate",
        top_logprobs: int | None = None,
        sampling: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        cache: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit a batch (inline ``requests`` or a JSONL file, streamed) and return the job.

        Options left as None take the server's defaults. A JSONL file is checked line by
        line first: a line that is not a JSON object raises ValidationError naming it,
        and nothing is sent. Without ``idempotency_key`` one is generated per call, so
        the automatic retries can never create the job twice.
        """
        _http.check_one_source(requests, jsonl_path)
        envelope = _http.submit_envelope(
            teacher=teacher,
            mode=mode,
            top_logprobs=top_logprobs,
            sampling=sampling,
            metadata=metadata,
            cache=cache,
        )
        headers = _http.submit_headers(idempotency_key)
        if requests is not None:
            return self._json(
                "POST", "/v1/jobs", json={**envelope, "requests": list(requests)}, headers=headers
            )
        assert jsonl_path is not None  # check_one_source: exactly one of requests and jsonl_path
        path = jsonl_path
        validate_jsonl(path)
        if is_large(path):
            file_id = self.upload(path)["id"]
            return self._json(
                "POST",
                "/v1/jobs",
                json={**envelope, "input_file_id": file_id},
                headers=headers,
                timeout=_http.without_read_timeout(self._http.timeout),
            )
        body = lambda: iter_submit_body(envelope, path)  # noqa: E731  (a fresh stream per attempt)
        return self._json(
            "POST", "/v1/jobs", body_factory=body, headers={**headers, "Content-Type": "application/json"}
        )

    def upload(self, jsonl_path: PathLike) -> dict[str, Any]:
        """Upload a JSONL file (``POST /v1/files``, purpose ``batch``), streamed from disk; the
        file object, whose ``id`` a job names as ``input_file_id``."""
        for attempt in retrying(self.retry):
            with attempt, open(jsonl_path, "rb") as file:  # from the start on every attempt
                timeout = _http.without_read_timeout(self._http.timeout)
                uploaded: dict[str, Any] = self._send_once(
                    "POST", "/v1/files", timeout=timeout, **_http.upload_fields(jsonl_path, file)
                ).json()
                return uploaded
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def get(self, job: JobRef) -> Job:
        """The job object: status, counts, timestamps, parameters and, once finished, shards."""
        return self._json("GET", _job_path(job))

    def list(
        self, limit: int | None = None, after: str | None = None, *, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of jobs, newest first: ``{"data": [...], "has_more", "next"}``.

        Pass the page's ``next`` as ``after`` (alias ``cursor``) for the following page.
        """
        return self._json("GET", "/v1/jobs", params=_http.list_params(limit, after or cursor))

    def iter_jobs(self, page_size: int | None = None) -> Iterator[Job]:
        """Every job, newest first, fetching pages as needed."""
        after = None
        while True:
            page = self.list(limit=page_size, after=after)
            yield from page["data"]
            after = page.get("next")
            if not page.get("has_more") or not after:
                return

    def cancel(self, job: JobRef) -> Job:
        """Stop handing out the job's pending requests; returns the job."""
        return self._json("POST", _job_path(job, "/cancel"))

    def errors(self, job: JobRef) -> builtins.list[dict[str, Any]]:
        """The failed requests: ``[{"request_index", "custom_id", "error"}]``, every page."""
        found: builtins.list[dict[str, Any]] = []
        params: dict[str, Any] = {}
        while True:
            page = self._json("GET", _job_path(job, "/errors"), params=params)
            found += _http.unwrap_list(page, "errors")
            if not page.get("has_more"):
                return found
            params = {"after": page["next"]}

    def shards(self, job: JobRef) -> builtins.list[dict[str, Any]]:
        """The shard manifest: ``[{"index", "url", "rows", "bytes", "sha256"}]``."""
        return _http.unwrap_list(self._json("GET", _job_path(job, "/shards")), "shards")

    def wait(
        self,
        job: JobRef,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        progress: bool | None = None,
        *,
        raise_on_failure: bool = False,
    ) -> Job:
        """Poll until the job is succeeded, failed or cancelled; return its final state.

        ``progress``: a bar on stderr (None: only when stderr is a terminal).
        Raises WaitTimeoutError after ``timeout`` seconds, and JobFailedError for a
        failed/cancelled job when ``raise_on_failure``.
        """
        deadline = _Deadline(timeout)
        with WaitProgress(wants_progress(progress)) as bar:
            while True:
                state = self.get(job)
                bar.update(state)
                if state.get("status") in FINISHED:
                    return _finished(state, raise_on_failure)
                if deadline.expired():
                    raise WaitTimeoutError(state, timeout or 0.0)
                time.sleep(deadline.nap(poll_interval))

    def download(self, job: JobRef, out_dir: PathLike) -> builtins.list[Path]:
        """Download every shard into ``out_dir``, resuming ``.part`` files, verifying sha256.

        Shards already there with the right sha256 are not fetched again.
        """
        return [self._download_shard(target) for target in _targets(self.shards(job), out_dir)]

    def score(
        self,
        sequences: Iterable[Iterable[int]],
        *,
        top_logprobs: int = 20,
        model: str | None = None,
        timeout: float | None = None,
    ) -> Scores:
        """The teacher's view of each token sequence, teacher-forced: at every position after the
        first, the logprob of the token there and the top-k alternatives, as padded numpy arrays
        (``.torch()`` for tensors). One synchronous ``POST /v1/completions`` (echo, max_tokens 0)
        answered in Arrow IPC; sequences scored before come from the cache. ``model`` defaults to
        the first the service lists (``GET /v1/models``)."""
        batch = [[int(t) for t in sequence] for sequence in sequences]
        body = {"model": model or self._first_model(), "prompt": batch, "max_tokens": 0, "temperature": 0,
                "echo": True, "logprobs": top_logprobs}
        response = self._request("POST", "/v1/completions", json=body, headers={"Accept": online_format.MEDIA_TYPE},
                                 timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        return online_format.read_scores(online_format.read_stream(response.content), [len(s) for s in batch])

    def _first_model(self) -> str:
        models = self._json("GET", "/v1/models")["data"]
        if not models:
            raise NotFoundError(404, "not_found", "the service lists no model (GET /v1/models)")
        return str(models[0]["id"])

    # -- plumbing --------------------------------------------------------------------

    def _json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self._request(method, url, **kwargs).json()  # every answer is an object
        return body

    def _request(
        self, method: str, url: str, *, body_factory: Callable[[], Any] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One call with retries; an error status raises its APIError subclass."""
        for attempt in retrying(self.retry):
            with attempt:
                content = body_factory() if body_factory else None
                return self._send_once(method, url, content=content, **kwargs)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _send_once(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"{method} {url}: {exc!r}") from exc
        if response.is_error:
            raise error_from_response(response)
        return response

    def _download_shard(self, target: ShardTarget) -> Path:
        if target.already_done():
            return target.path
        for attempt in retrying(self.retry):
            with attempt:
                return self._download_attempt(target)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _download_attempt(self, target: ShardTarget) -> Path:
        offset = target.resume_offset()
        if not target.is_complete_on_disk(offset):
            self._fetch_into_part(target, offset)
        return target.finish()

    def _fetch_into_part(self, target: ShardTarget, offset: int) -> None:
        headers = {**_IDENTITY, **target.request_headers(offset)}
        try:
            with self._http.stream("GET", target.url, headers=headers) as response:
                if response.is_error:
                    response.read()
                _raise_for_download_status(response, target)
                with target.open_for(response, offset) as file:
                    for chunk in response.iter_bytes():
                        file.write(chunk)
        except httpx.TransportError as exc:
            raise TransportError(f"GET {target.url}: {exc!r}") from exc
        target.check_length()


def _raise_for_download_status(response: httpx.Response, target: ShardTarget) -> None:
    """Map an error status (its body already read); a 416 means our .part no longer fits
    the shard, so it is dropped and the retry starts over."""
    if response.status_code == 416:
        target.restart()
        raise TransportError(f"GET {target.url}: range not satisfiable, restarting the download")
    if response.is_error:
        raise error_from_response(response)


class AsyncClient:
    """The asyncio twin of :class:`Client`: the same methods, as coroutines."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_url = _http.resolve_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            transport=transport, **_http.http_options(self.base_url, api_key, timeout)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the API (see Client for the documentation of each call) ---------------------

    async def teachers(self) -> builtins.list[dict[str, Any]]:
        return _http.unwrap_list(await self._json("GET", "/v1/teachers"), "teachers")

    async def submit(
        self,
        requests: Iterable[dict[str, Any]] | None = None,
        *,
        jsonl_path: PathLike | None = None,
        teacher: str | None = None,
        mode: str = "generate",
        top_logprobs: int | None = None,
        sampling: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        cache: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        _http.check_one_source(requests, jsonl_path)
        envelope = _http.submit_envelope(
            teacher=teacher,
            mode=mode,
            top_logprobs=top_logprobs,
            sampling=sampling,
            metadata=metadata,
            cache=cache,
        )
        headers = _http.submit_headers(idempotency_key)
        if requests is not None:
            return await self._json(
                "POST", "/v1/jobs", json={**envelope, "requests": list(requests)}, headers=headers
            )
        assert jsonl_path is not None  # check_one_source: exactly one of requests and jsonl_path
        path = jsonl_path
        validate_jsonl(path)
        if is_large(path):
            file_id = (await self.upload(path))["id"]
            return await self._json(
                "POST",
                "/v1/jobs",
                json={**envelope, "input_file_id": file_id},
                headers=headers,
                timeout=_http.without_read_timeout(self._http.timeout),
            )
        body = lambda: aiter_submit_body(envelope, path)  # noqa: E731  (a fresh stream per attempt)
        return await self._json(
            "POST", "/v1/jobs", body_factory=body, headers={**headers, "Content-Type": "application/json"}
        )

    async def upload(self, jsonl_path: PathLike) -> dict[str, Any]:
        async for attempt in async_retrying(self.retry):
            with attempt, open(jsonl_path, "rb") as file:
                timeout = _http.without_read_timeout(self._http.timeout)
                response = await self._send_once(
                    "POST", "/v1/files", timeout=timeout, **_http.upload_fields(jsonl_path, file)
                )
                uploaded: dict[str, Any] = response.json()
                return uploaded
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def get(self, job: JobRef) -> Job:
        return await self._json("GET", _job_path(job))

    async def list(
        self, limit: int | None = None, after: str | None = None, *, cursor: str | None = None
    ) -> dict[str, Any]:
        return await self._json("GET", "/v1/jobs", params=_http.list_params(limit, after or cursor))

    async def iter_jobs(self, page_size: int | None = None) -> AsyncIterator[Job]:
        after = None
        while True:
            page = await self.list(limit=page_size, after=after)
            for job in page["data"]:
                yield job
            after = page.get("next")
            if not page.get("has_more") or not after:
                return

    async def cancel(self, job: JobRef) -> Job:
        return await self._json("POST", _job_path(job, "/cancel"))

    async def errors(self, job: JobRef) -> builtins.list[dict[str, Any]]:
        found: builtins.list[dict[str, Any]] = []
        params: dict[str, Any] = {}
        while True:
            page = await self._json("GET", _job_path(job, "/errors"), params=params)
            found += _http.unwrap_list(page, "errors")
            if not page.get("has_more"):
                return found
            params = {"after": page["next"]}

    async def shards(self, job: JobRef) -> builtins.list[dict[str, Any]]:
        return _http.unwrap_list(await self._json("GET", _job_path(job, "/shards")), "shards")

    async def wait(
        self,
        job: JobRef,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        progress: bool | None = None,
        *,
        raise_on_failure: bool = False,
    ) -> Job:
        deadline = _Deadline(timeout)
        with WaitProgress(wants_progress(progress)) as bar:
            while True:
                state = await self.get(job)
                bar.update(state)
                if state.get("status") in FINISHED:
                    return _finished(state, raise_on_failure)
                if deadline.expired():
                    raise WaitTimeoutError(state, timeout or 0.0)
                await asyncio.sleep(deadline.nap(poll_interval))

    async def download(self, job: JobRef, out_dir: PathLike) -> builtins.list[Path]:
        return [await self._download_shard(target) for target in _targets(await self.shards(job), out_dir)]

    # -- plumbing --------------------------------------------------------------------

    async def _json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = (await self._request(method, url, **kwargs)).json()  # every answer is an object
        return body

    async def _request(
        self, method: str, url: str, *, body_factory: Callable[[], Any] | None = None, **kwargs: Any
    ) -> httpx.Response:
        async for attempt in async_retrying(self.retry):
            with attempt:
                content = body_factory() if body_factory else None
                return await self._send_once(method, url, content=content, **kwargs)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _send_once(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"{method} {url}: {exc!r}") from exc
        if response.is_error:
            raise error_from_response(response)
        return response

    async def _download_shard(self, target: ShardTarget) -> Path:
        # Hashing a large shard takes seconds: off the event loop.
        if await asyncio.to_thread(target.already_done):
            return target.path
        async for attempt in async_retrying(self.retry):
            with attempt:
                return await self._download_attempt(target)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _download_attempt(self, target: ShardTarget) -> Path:
        offset = target.resume_offset()
        if not target.is_complete_on_disk(offset):
            await self._fetch_into_part(target, offset)
        return await asyncio.to_thread(target.finish)

    async def _fetch_into_part(self, target: ShardTarget, offset: int) -> None:
        headers = {**_IDENTITY, **target.request_headers(offset)}
        try:
            async with self._http.stream("GET", target.url, headers=headers) as response:
                if response.is_error:
                    await response.aread()
                _raise_for_download_status(response, target)
                with target.open_for(response, offset) as file:
                    async for chunk in response.aiter_bytes():
                        file.write(chunk)
        except httpx.TransportError as exc:
            raise TransportError(f"GET {target.url}: {exc!r}") from exc
        target.check_length()
