"""Every error becomes JSON: {"detail": "..."} (or {"error": "..."} under /v2/), never an HTML 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.engine import EngineClosedError, EngineError, QueueFullError
from app.errors import APIError, validation_message
from app.model_store import ModelStoreError
from app.service import NotReadyError

log = logging.getLogger("dsphere.errors")


def error_json(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message} if request.url.path.startswith("/v2/") else {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_json(request, exc.status_code, exc.detail, exc.headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_json(request, exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        status = 400 if request.url.path.startswith("/v2/") else 422
        return error_json(request, status, validation_message(exc.errors()) or "invalid request")

    async def not_ready(request: Request, exc: Exception) -> JSONResponse:
        return error_json(request, 503, str(exc), {"Retry-After": "5"})

    async def engine_busy(request: Request, exc: Exception) -> JSONResponse:  # queue full, or shutting down
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
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(NotReadyError, not_ready)
    app.add_exception_handler(QueueFullError, engine_busy)
    app.add_exception_handler(EngineClosedError, engine_busy)
    app.add_exception_handler(EngineError, engine_error)
    app.add_exception_handler(ModelStoreError, store_error)
    app.add_exception_handler(Exception, unhandled)
