"""The web page at / (try every model in a browser) and BentoML's Swagger UI moved to /docs.

The page is static files from service/static/: plain HTML, CSS and a small script that calls the same public
routes any client calls (/models, /classify, /segment, /generate). No build step, nothing from another origin:
the Content-Security-Policy below lets the page load only from the server itself.

BentoML serves its Swagger UI at `/` (with a Google Tag Manager loader in it). The mounted app's routes are
matched before BentoML adds that index route (bentoml/_bentoml_impl/server/app.py appends mounts first), so
our `/` wins; /docs serves a Swagger page of our own, over BentoML's bundled Swagger UI files
(/static_content/) and our OpenAPI document (/openapi.json), without the tag manager.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATH = "/"
STATIC_PREFIX = "/static/"

# Only this origin; images also from data: (generated samples, decoded masks) and blob: (previews of the
# files a user chose). No inline script or style anywhere: element.style set from the script is CSSOM, which
# style-src does not govern.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")
# Swagger UI writes <style> elements of its own: inline styles allowed there, scripts still only from here.
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def security_headers(csp: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        # A new release of the page must not meet an old cached script.
        "Cache-Control": "no-cache",
    }


def is_public_page_path(path: str) -> bool:
    """The page and its files are open even when an API key is set: they hold no data, and the page is where a
    user types the key in (service/security.py). Every route the page calls still needs it."""
    return path == PAGE_PATH or path.startswith(STATIC_PREFIX)


async def index_page(request: Request) -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=security_headers(PAGE_CSP))


async def swagger_page(request: Request) -> FileResponse:
    return FileResponse(STATIC_DIR / "docs.html", headers=security_headers(DOCS_CSP))


class StaticFilesWithHeaders(StaticFiles):
    """StaticFiles whose answers carry the page's headers too (nosniff matters for scripts)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extra = [(name.lower().encode(), value.encode()) for name, value in security_headers(PAGE_CSP).items()]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


ROUTES = [
    Route(PAGE_PATH, index_page, methods=["GET"]),
    Route("/docs", swagger_page, methods=["GET"]),
    Mount(STATIC_PREFIX.rstrip("/"), app=StaticFilesWithHeaders(directory=STATIC_DIR), name="static"),
]
