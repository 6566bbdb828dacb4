"""What Client and AsyncClient share: configuration, auth, request bodies, response shapes."""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx

from teachercache._version import __version__

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "TEACHERCACHE_URL"
API_KEY_ENV = "TEACHERCACHE_API_KEY"


def resolve_base_url(base_url: str | None) -> str:
    return base_url or os.environ.get(URL_ENV) or DEFAULT_URL


STATE_DIR_ENV = "TEACHERCACHE_STATE_DIR"
LOCAL_KEY_FILE = "api-key"  # what the embedded stack (`teachercache up` / `serve`) writes in its state folder


def resolve_api_key(api_key: str | None, base_url: str = DEFAULT_URL) -> str | None:
    """The key given, else $TEACHERCACHE_API_KEY, else, for a service on this machine only,
    the embedded stack's own key from its state folder: the README's first steps need no export."""
    return api_key or os.environ.get(API_KEY_ENV) or (local_stack_key() if is_loopback(base_url) else None)


def is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_key_candidates() -> list[Path]:
    """Where the embedded stack keeps its key: $TEACHERCACHE_STATE_DIR, else `.state` in the
    current folder, else `.state` beside this package in a source checkout (the server's default)."""
    if os.environ.get(STATE_DIR_ENV):
        return [Path(os.environ[STATE_DIR_ENV]) / LOCAL_KEY_FILE]
    return [Path.cwd() / ".state" / LOCAL_KEY_FILE, Path(__file__).resolve().parents[1] / ".state" / LOCAL_KEY_FILE]


def local_stack_key() -> str | None:
    for path in local_key_candidates():
        try:
            key = path.read_text().strip()
        except OSError:
            continue
        if key:
            return key
    return None


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer <key>``, but only towards the service itself.

    A manifest may point at another host (a presigned object-store URL); that host must
    not see the key, and would often reject a request carrying a second credential.
    """

    def __init__(self, api_key: str | None, base_url: str) -> None:
        self._api_key = api_key
        self._origin = _origin(httpx.URL(base_url))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._api_key and _origin(request.url) == self._origin:
            request.headers["Authorization"] = f"Bearer {self._api_key}"
        yield request


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def http_options(base_url: str, api_key: str | None, timeout: float | httpx.Timeout | None) -> dict[str, Any]:
    """Keyword arguments for httpx.Client / httpx.AsyncClient."""
    return {
        "base_url": base_url,
        "auth": BearerAuth(resolve_api_key(api_key, base_url), base_url),
        "timeout": timeout,
        "headers": {"User-Agent": f"teachercache-python/{__version__}"},
        "follow_redirects": True,
    }


def submit_envelope(
    *,
    teacher: str | None,
    mode: str,
    top_logprobs: int | None,
    sampling: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
    cache: str | None,
) -> dict[str, Any]:
    """The job fields besides ``requests``; unset ones are left out so the server's defaults apply."""
    fields = {
        "teacher": teacher,
        "mode": mode,
        "top_logprobs": top_logprobs,
        "sampling": {k: v for k, v in (sampling or {}).items() if v is not None} or None,
        "metadata": metadata,
        "cache": cache,
    }
    return {key: value for key, value in fields.items() if value is not None}


def submit_headers(idempotency_key: str | None) -> dict[str, str]:
    # Retrying a POST is only safe when the server can recognise the retry, so every
    # submission carries a key; a generated one covers the retries of this call.
    return {"Idempotency-Key": idempotency_key or f"tc-{uuid.uuid4().hex}"}


def without_read_timeout(timeout: httpx.Timeout) -> httpx.Timeout:
    """For an upload, and the job that reads it: the server answers once it has stored or read the
    whole file (minutes for 10^7 requests); a retry meanwhile would only find it still being written."""
    return httpx.Timeout(connect=timeout.connect, read=None, write=timeout.write, pool=timeout.pool)


def upload_fields(path: str | os.PathLike[str], file: Any) -> dict[str, Any]:
    """``POST /v1/files`` multipart fields: httpx reads the open file a chunk at a time."""
    return {"files": {"file": (Path(path).name, file, "application/jsonl")}, "data": {"purpose": "batch"}}


def check_one_source(requests: Any, jsonl_path: Any) -> None:
    if (requests is None) == (jsonl_path is None):
        raise TypeError("submit() takes exactly one of requests= or jsonl_path=")


def list_params(limit: int | None, after: str | None) -> dict[str, Any]:
    return {key: value for key, value in (("limit", limit), ("after", after)) if value is not None}


def unwrap_list(body: Any, key: str) -> list[dict[str, Any]]:
    """``{"<key>": [...]}`` (the contract), ``{"data": [...]}`` or a bare list."""
    if isinstance(body, list):
        return body
    items = body.get(key, body.get("data"))
    if not isinstance(items, list):
        raise ValueError(f"expected a {key!r} list in the response, got keys {sorted(body)}")
    return items
