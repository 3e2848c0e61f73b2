"""Every error becomes JSON: {"detail": "..."} (or {"error": "..."} under /v2/), never an HTML 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.engine import EngineClosedError, EngineError, QueueFullError
from app.images import ImageError
from app.model_store import ModelStoreError
from app.service import NotReadyError
from app.uploads import BodyError

log = logging.getLogger("dsphere.errors")


class APIError(Exception):
    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def error_json(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message} if request.url.path.startswith("/v2/") else {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    msgs = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msgs.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(msgs) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError | ImageError | BodyError)
        headers = exc.headers if isinstance(exc, APIError) else None
        return error_json(request, exc.status_code, exc.detail, headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_json(request, exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        status = 400 if request.url.path.startswith("/v2/") else 422
        return error_json(request, status, _validation_message(exc))

    async def not_ready(request: Request, exc: Exception) -> JSONResponse:
        return error_json(request, 503, str(exc), {"Retry-After": "5"})

    async def queue_full(request: Request, exc: Exception) -> JSONResponse:
        return error_json(request, 503, str(exc), {"Retry-After": "1"})

    async def closed(request: Request, exc: Exception) -> JSONResponse:
        return error_json(request, 503, str(exc), {"Retry-After": "1"})

    async def engine_error(request: Request, exc: Exception) -> JSONResponse:
        return error_json(request, 500, f"inference failed: {exc}")

    async def store_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ModelStoreError)
        return error_json(request, exc.status_code, str(exc))

    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_json(request, 500, "internal server error")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(ImageError, api_error)
    app.add_exception_handler(BodyError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(NotReadyError, not_ready)
    app.add_exception_handler(QueueFullError, queue_full)
    app.add_exception_handler(EngineClosedError, closed)
    app.add_exception_handler(EngineError, engine_error)
    app.add_exception_handler(ModelStoreError, store_error)
    app.add_exception_handler(Exception, unhandled)
