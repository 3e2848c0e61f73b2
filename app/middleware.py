"""Pure-ASGI middleware: request id, request metrics by route template."""

from __future__ import annotations

import re
import time
import uuid

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
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                cand = v.decode("latin-1")
                if _RID.match(cand):
                    rid = cand
                break
        rid = rid or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = endpoint_label(scope)
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(endpoint, str(status)).inc()
