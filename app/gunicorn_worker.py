"""The uvicorn worker gunicorn.conf.py runs: uvicorn's own, with the options the image's single
uvicorn had on its command line (no Server header; in-flight requests drained for up to 20 s on
SIGTERM, within gunicorn's graceful_timeout)."""

from __future__ import annotations

from typing import Any

from uvicorn.workers import UvicornWorker


class Worker(UvicornWorker):
    CONFIG_KWARGS: dict[str, Any] = {**UvicornWorker.CONFIG_KWARGS, "server_header": False,
                                     "timeout_graceful_shutdown": 20}
