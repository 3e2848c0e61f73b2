"""/docs (Swagger UI) and /redoc from assets shipped with the service, never a CDN, so that both
work without internet (in the container, on an air-gapped network).

The assets are the copies of swagger-ui-dist and ReDoc's standalone bundle that the
fastapi-offline package ships (its files only; the app is built by app/main.py as usual),
served under /assets/docs. One edit, made as the bundle is served: ReDoc's sidebar shows
Redocly's logo from its CDN; that URL becomes an empty inline image, so that the browser asks
nothing of any other origin (tests/app/test_page.py checks its request log).
"""

from __future__ import annotations

import functools
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/assets/docs"
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
FAVICON = "/assets/page/favicon.svg"
REDOC_BUNDLE = "redoc.standalone.js"
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_IMAGE = b"data:image/svg+xml,%3Csvg%20xmlns=%27http://www.w3.org/2000/svg%27/%3E"


@functools.cache
def redoc_bundle() -> bytes:
    """ReDoc's standalone bundle with its one CDN image replaced by an empty inline one."""
    return (ASSETS_DIR / REDOC_BUNDLE).read_bytes().replace(REDOC_CDN_LOGO, EMPTY_IMAGE)


def install_docs(app: FastAPI) -> None:
    """GET /docs and /redoc; build the app with docs_url=None and redoc_url=None."""

    @app.get(f"{ASSETS_URL}/{REDOC_BUNDLE}", include_in_schema=False)
    async def redoc_js() -> Response:  # matched before the mount below
        return Response(redoc_bundle(), media_type="text/javascript")

    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{FAVICON}",
            # no badge that sends the document to validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{FAVICON}",
            with_google_fonts=False,
        )
