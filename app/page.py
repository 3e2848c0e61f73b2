"""GET /: the service's own page for people: try an image (dropped, pasted, picked, or one of
the bundled examples) and see why it was accepted or rejected.

Self-contained: its HTML, scripts (ES modules: page.js and what it imports), style and example
images are the files of app/static, served under /assets/page, and its Content-Security-Policy
lets the browser fetch nothing from any other origin. The page talks to the service's JSON API
only: GET /models and /models/{name}, POST /explain, GET /stats.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/assets/page"
STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = STATIC_DIR / "index.html"
# 'self' only: scripts, styles, fetches and images (blob: the preview of the user's own file).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# Module scripts run only when served with a JavaScript MIME type: RFC 9239's, whatever the
# machine's own table says (StaticFiles asks mimetypes).
mimetypes.add_type("text/javascript", ".js")


def install_page(app: FastAPI) -> None:
    app.mount(ASSETS_URL, StaticFiles(directory=STATIC_DIR), name="page-assets")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(INDEX, media_type="text/html",
                            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                     "X-Content-Type-Options": "nosniff"})
