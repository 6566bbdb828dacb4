"""Request-scoped dependencies: the runtime, the caller, and a session whose transaction the
handler owns.

Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in its
threadpool, a thread hop per dependency per request (each status poll paid several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import orm

from service.errors import MisdirectedRequest
from service.http.auth_first import authenticate
from service.http.ui_pages import COOKIE
from service.jobs.limits import JobLimits
from service.jobs.service import JobService
from service.openai_batch.service import OpenAIBatchService
from service.runtime import Runtime
from service.settings import ServiceSettings
from service.tenants.service import Caller

bearer = HTTPBearer(auto_error=False, description="An API key (`teachercache keys create --tenant NAME`).")


def runtime_of(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def runtime(request: Request) -> Runtime:
    return runtime_of(request)


def session(request: Request) -> Iterator[orm.Session]:
    """One transaction per request: committed when the handler returns, rolled back on error.

    Used with `scope="function"` (below): the commit runs before the response is sent, so a
    client never holds a 200 for a write that did not commit (the default, request scope, runs
    the exit after the response has gone)."""
    with runtime_of(request).sessions() as db, db.begin():
        yield db


Db = Annotated[orm.Session, Depends(session, scope="function")]


def caller(request: Request,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    """The tenant behind the request's API key, checked against the database on every request,
    so a revoked key stops working at once (a request with a body was checked already, before
    its body was read: auth_first.py)."""
    found: Caller | None = getattr(request.state, "caller", None)
    if found is not None:
        return found
    if credentials is None and request.method in ("GET", "HEAD"):
        # The status page's session cookie (HttpOnly, SameSite=Strict) lets its download links
        # work; only for reads, so no cross-site form can make a write with it.
        return authenticate(runtime_of(request), request.cookies.get(COOKIE))
    return authenticate(runtime_of(request), credentials.credentials if credentials else None)


def limits_of(rt: Runtime, who: Caller) -> JobLimits:
    """The service's limits, with the tenant's own values in place."""
    return JobLimits.from_settings(rt.settings).for_tenant(who.limits)


async def job_limits(request: Request, who: Annotated[Caller, Depends(caller)]) -> JobLimits:
    return limits_of(runtime_of(request), who)


def jobs_of(db: orm.Session, rt: Runtime, who: Caller) -> JobService:
    """The caller's jobs in `db`'s transaction: the tenant, its limits, the teachers' prices (for
    spend). Every handler builds its JobService here."""
    return JobService(db, who.tenant, limits_of(rt, who), prices=rt.teachers.prices)


async def job_service(request: Request, db: Db, who: Annotated[Caller, Depends(caller)]) -> JobService:
    """The caller's jobs, in the request's transaction."""
    return jobs_of(db, runtime_of(request), who)


async def batch_service(request: Request, db: Db, who: Annotated[Caller, Depends(caller)]) -> OpenAIBatchService:
    """The caller's OpenAI files and batches, in the request's transaction, with the caller's limits
    (a batch is submitted as a job)."""
    rt = runtime_of(request)
    return OpenAIBatchService(db, who.tenant, rt.storage, rt.teachers, limits_of(rt, who))


def shard_url_builder(request: Request) -> Callable[[str], str]:
    base = public_base_url(runtime_of(request).settings, request)
    return lambda shard_id: f"{base}/v1/shards/{shard_id}"


def public_base_url(settings: ServiceSettings, request: Request) -> str:
    """`public_url`; else the request's own base URL, which in production only a trusted Host gives."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = (request.url.hostname or "").lower()
    if settings.production and host not in {h.lower() for h in settings.allowed_hosts}:
        raise MisdirectedRequest("this server builds no URLs from the Host header it was sent; its operator sets "
                                 "TEACHERCACHE_PUBLIC_URL (or TEACHERCACHE_ALLOWED_HOSTS)", field="Host")
    return str(request.base_url).rstrip("/")


Rt = Annotated[Runtime, Depends(runtime)]
Who = Annotated[Caller, Depends(caller)]
Limits = Annotated[JobLimits, Depends(job_limits)]
Jobs = Annotated[JobService, Depends(job_service)]
Batches = Annotated[OpenAIBatchService, Depends(batch_service)]
