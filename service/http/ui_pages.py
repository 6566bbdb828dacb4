"""The status page's templates and how an error looks on it (HTML, not the JSON error body).

Kept apart from the routes so the one error handler (errors.py) can render a page without
importing the routes and their dependencies.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from service.errors import TeachercacheError, Unauthenticated

UI_DIR = Path(__file__).parent / "ui"
templates = Jinja2Templates(directory=str(UI_DIR))
COOKIE = "teachercache_key"  # the API key, for this browser session only (no Max-Age)


def is_ui(request: Request) -> bool:
    return request.url.path == "/ui" or request.url.path.startswith("/ui/")


def ui_error(request: Request, exc: TeachercacheError) -> Response:
    """No key (or a revoked one) sends the browser to the login form; anything else is a page."""
    if isinstance(exc, Unauthenticated):
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response
    return templates.TemplateResponse(request, "error.html", {"tenant": None, "status_code": exc.status_code,
                                                             "message": exc.message}, status_code=exc.status_code)
