"""The status page: `/ui` (and `/ui/jobs`) lists the caller's jobs, `/ui/jobs/{id}` shows one,
`/ui/workers` and `/ui/cache` the fleet and the cache. Server-rendered HTML; htmx (vendored,
no build step) refreshes the parts that change while something runs.

The API key is entered once in a form and kept in an HttpOnly, SameSite=Strict session cookie;
every page reads through the same services, scoped to the key's tenant, as the JSON API does,
so nothing of another tenant is ever shown (its job's page is a 404, as in the API).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import orm

from service.errors import Unauthenticated
from service.http.auth_first import authenticate
from service.http.deps import Db, runtime_of, shard_url_builder
from service.http.params import JobCursor, JobId
from service.http.ui_pages import COOKIE, templates
from service.jobs.schemas import JobOut
from service.jobs.service import JobService
from service.states import JOB_HIDDEN, JOB_UNFINISHED, JobStatus
from service.status.service import ProgressPoint, StatusService, pace
from service.tenants.service import Caller

router = APIRouter(prefix="/ui", include_in_schema=False)

STATUSES = tuple(s.value for s in JobStatus if s not in JOB_HIDDEN)  # the filter's choices
JOBS_PER_PAGE = 50
ERRORS_PER_PAGE = 50
WORKERS_SEEN_S = 3600
WORKER_ALIVE_S = 60


def ui_caller(request: Request) -> Caller:
    """The tenant of the key in the session cookie; without one, the login form (ui_error)."""
    key = request.cookies.get(COOKIE)
    if not key:
        raise Unauthenticated("log in with an API key")
    return authenticate(runtime_of(request), key)


UiCaller = Annotated[Caller, Depends(ui_caller)]


def page(request: Request, template: str, who: Caller | None, **context: Any) -> Response:
    return templates.TemplateResponse(request, template, {"tenant": who.tenant if who else None, **context})


@router.get("/login")
def login_form(request: Request) -> Response:
    return page(request, "login.html", None, message=None)


@router.post("/login")
def login(request: Request, key: Annotated[str, Form(max_length=400)] = "") -> Response:
    try:
        authenticate(runtime_of(request), key.strip() or None)
    except Unauthenticated as exc:
        return templates.TemplateResponse(request, "login.html", {"tenant": None, "message": exc.message},
                                          status_code=401)
    response = RedirectResponse("/ui/jobs", status_code=303)
    response.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


def jobs_context(request: Request, db: orm.Session, who: Caller, status: str | None, after: str | None) -> dict[str, Any]:
    jobs = JobService(db, who.tenant, prices=runtime_of(request).teachers.prices)
    found, has_more = jobs.page(JOBS_PER_PAGE, after, status)
    urls = shard_url_builder(request)
    described = [jobs.describe(job, urls) for job in found]
    query = {k: v for k, v in {"status": status, "after": after}.items() if v}
    next_query = {**query, "after": described[-1].id} if has_more else None
    return {"rows": [(job, pace(job)) for job in described], "status": status or "", "statuses": STATUSES,
            "refresh": any(job.status in JOB_UNFINISHED for job in described),
            "self_url": "/ui/jobs/table" + (f"?{urlencode(query)}" if query else ""),
            "next_url": f"/ui/jobs?{urlencode(next_query)}" if next_query else None}


StatusFilter = Annotated[str | None, Query(pattern="^(" + "|".join(STATUSES) + ")?$")]


@router.get("")
@router.get("/jobs")
def jobs_page(request: Request, db: Db, who: UiCaller, status: StatusFilter = None, after: JobCursor = None) -> Response:
    return page(request, "jobs.html", who, **jobs_context(request, db, who, status or None, after))


@router.get("/jobs/table")
def jobs_table(request: Request, db: Db, who: UiCaller, status: StatusFilter = None, after: JobCursor = None) -> Response:
    return page(request, "jobs_table.html", who, **jobs_context(request, db, who, status or None, after))


def live_context(request: Request, db: orm.Session, who: Caller, job_id: str) -> dict[str, Any]:
    jobs = JobService(db, who.tenant, prices=runtime_of(request).teachers.prices)
    job = jobs.describe(jobs.get(job_id), shard_url_builder(request))  # NotFound for another tenant's
    return {"job": job, "pace": pace(job), "refresh": job.status in JOB_UNFINISHED,
            "chart": chart(StatusService(db).progress(job_id), job)}


@router.get("/jobs/{job_id}")
def job_page(job_id: JobId, request: Request, db: Db, who: UiCaller,
             errors_after: Annotated[int, Query(ge=-1, le=2**31 - 1)] = -1) -> Response:
    context = live_context(request, db, who, job_id)
    errors, has_more = JobService(db, who.tenant).errors(job_id, ERRORS_PER_PAGE, errors_after)
    return page(request, "job.html", who, **context, errors=errors, errors_after=errors_after,
                errors_next=errors[-1].request_index if has_more else None)


@router.get("/jobs/{job_id}/live")
def job_live(job_id: JobId, request: Request, db: Db, who: UiCaller) -> Response:
    return page(request, "job_live.html", who, **live_context(request, db, who, job_id))


@router.get("/workers")
def workers_page(request: Request, db: Db, who: UiCaller) -> Response:
    return page(request, "workers.html", who, workers=StatusService(db).workers(WORKERS_SEEN_S, WORKER_ALIVE_S))


@router.get("/cache")
def cache_page(request: Request, db: Db, who: UiCaller) -> Response:
    return page(request, "cache.html", who, cache=StatusService(db).cache(who.tenant))


CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 640, 160, 20


def chart(points: list[ProgressPoint], job: JobOut) -> dict[str, Any] | None:
    """Done and failed over time as SVG polylines: the snapshots, then the counts of now."""
    now = datetime.fromisoformat(job.finished_at) if job.finished_at else datetime.now(UTC)
    counts = job.counts
    series = [(p.at, p.completed + p.cached + p.failed, p.failed) for p in points]
    series.append((now, counts.completed + counts.cached + counts.failed, counts.failed))
    if len(series) < 2 or not counts.total:
        return None
    start = series[0][0]
    span = max((now - start).total_seconds(), 1e-3)

    def xy(at: datetime, value: int) -> str:
        x = CHART_PAD + (at - start).total_seconds() / span * (CHART_WIDTH - 2 * CHART_PAD)
        y = CHART_HEIGHT - CHART_PAD - value / counts.total * (CHART_HEIGHT - 2 * CHART_PAD)
        return f"{x:.1f},{y:.1f}"

    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "points": len(series), "span_s": span,
            "done": " ".join(xy(at, done) for at, done, _ in series),
            "failed": " ".join(xy(at, failed) for at, _, failed in series)}
