"""The FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service.http import errors, routes_cache, routes_jobs, routes_misc, routes_online, routes_openai, routes_ui
from service.http.auth_first import AuthenticateFirst
from service.http.body_limit import BodySizeLimit, body_limits
from service.http.json_body import document_bodies
from service.http.ui_pages import UI_DIR
from service.jobs.finalizer import Finalizer
from service.runtime import Runtime
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


def create_app(rt: Runtime | None = None, run_finalizer: bool = True) -> FastAPI:
    rt = rt or Runtime.from_settings(ServiceSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if run_finalizer:
            app.state.finalizer.start()
        yield
        if run_finalizer:
            app.state.finalizer.stop()

    # No trailing-slash redirects: a path names a route or is a 404 (a redirect would turn
    # `/v1/jobs/%2e%2e/` into a Location the client resolves elsewhere).
    app = FastAPI(title="teachercache", version="1", lifespan=lifespan, redirect_slashes=False)
    app.state.runtime = rt
    app.state.finalizer = Finalizer(rt, poll_s=rt.settings.finalizer_poll_s)
    errors.install(app)
    document_bodies(app)
    app.add_middleware(BodySizeLimit, limits=body_limits(rt.settings))
    app.add_middleware(AuthenticateFirst, runtime=rt)  # outermost: before any limit or body is read
    app.include_router(routes_jobs.router, responses=errors.RESPONSES)
    app.include_router(routes_misc.router, responses=errors.RESPONSES)
    app.include_router(routes_misc.health_router, responses=errors.RESPONSES)
    app.include_router(routes_cache.router, responses=errors.RESPONSES)
    app.include_router(routes_openai.router, responses=errors.RESPONSES)
    app.include_router(routes_online.router, responses=errors.ONLINE_RESPONSES)
    app.include_router(routes_online.health_router)
    app.include_router(routes_ui.router)
    app.mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static")
    return app
