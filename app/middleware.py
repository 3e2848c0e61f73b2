"""Pure-ASGI middleware: request id, request metrics by route template."""

from __future__ import annotations

import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics

_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def endpoint_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    # A mount (the page's and the docs' static files): FastAPI's router sets no "route" for it,
    # but Starlette's Mount hands its prefix down in root_path (after the app's own root path).
    if route is None and "app_root_path" in scope:
        mount = str(scope.get("root_path", ""))[len(str(scope["app_root_path"])):]
        if mount:
            return f"{mount}/{{path}}"
    return "unmatched"


class RequestMetricsMiddleware:
    """The one middleware of the app: the request id (the client's X-Request-ID if well-formed, else a
    new one; in scope["state"] and on the response) and the request's metrics (one duration
    observation and one count, by route template and status), in one wrapper around the app."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                cand = v.decode("latin-1")
                if _RID.match(cand):
                    rid = cand
                break
        if rid is None:
            rid = os.urandom(16).hex()  # what uuid4().hex looks like (32 hex digits), without the UUID object
        state = scope.get("state")
        if state is None:
            scope["state"] = {"request_id": rid}
        else:
            state["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers")
                message["headers"] = [*headers, rid_header] if headers else [rid_header]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(endpoint_label(scope), status, time.perf_counter() - t0)
