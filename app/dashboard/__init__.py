"""The web dashboard: a static client (HTML and ES modules, no build step) served by the API at `/`.

The pages call the `/v1` JSON API with the key in the `Authorization` header, so tenancy, validation and error
messages are the API's own. Every dashboard response carries a Content-Security-Policy that allows scripts,
styles and connections from this origin only: no inline script, nothing from a CDN.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"
ASSETS_PATH = "/ui"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """The client's files, each answered with the dashboard's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


async def index() -> FileResponse:
    """The single page; the client routes by the URL fragment, so only `/` serves HTML."""
    return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


def install(app: FastAPI) -> None:
    """Serve the page at `/` and its scripts, styles and the vendored chart library under `/ui/`."""
    app.add_api_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(ASSETS_PATH, DashboardFiles(directory=STATIC), name="dashboard")
