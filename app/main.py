"""ASGI entry point: `uvicorn app.main:app` (settings from DSPHERE_* environment variables)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from PIL import Image
from prometheus_client import CollectorRegistry

from app import admin, catalogue, classify, explain, grpc_server, monitoring, stats, v2
from app.deps import known_query_only
from app.docs import install_docs
from app.error_handlers import install_error_handlers
from app.metrics import Metrics
from app.middleware import RequestMetricsMiddleware
from app.page import install_page
from app.service import Service
from app.settings import Settings, SettingsError, load_settings


def create_app(settings: Settings | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the app; the model loads (verified, warmed) in the lifespan startup."""
    if settings is None:
        settings = load_settings()
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    # Pillow's own bomb guard: warning above this, error above twice this (both -> 413).
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    service = Service(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.load()
        # the Open Inference Protocol over gRPC on its own port (DSPHERE_GRPC_PORT), same loop and service
        grpc = await grpc_server.start(service) if settings.grpc_port else None
        # Move everything alive after start-up (FastAPI, pydantic, numpy, ONNX Runtime, the
        # model: hundreds of thousands of objects) out of the cyclic GC's reach. Without it
        # every full collection walks them all and stalls the event loop for tens of ms:
        # measured p99 at 16 concurrent clients 55-60 ms -> 23 ms (docs/API.md, Benchmarks).
        gc.collect()
        gc.freeze()
        service.recent.sample()  # the window's first reading, before any request (then every step: run())
        loop = asyncio.get_running_loop()
        sampler = loop.create_task(service.recent.run(), name="recent-counters")
        follower = loop.create_task(service.follow(), name="served-model-file")  # other workers' reloads
        try:
            yield
        finally:
            for task in (sampler, follower):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if grpc is not None:
                await grpc_server.stop(grpc)  # refuses new calls, those in flight get a grace period
            await service.close()  # uvicorn has already waited for in-flight requests

    app = FastAPI(
        title="dsphere",
        version="0.1.0",
        description="Image classification that says what each input is AND whether to trust it "
        "(D-SphereNet robust geodesic inference). See docs/API.md.",
        lifespan=lifespan,
        dependencies=[Depends(known_query_only)],  # an unknown query parameter is a 400 (app/deps.py)
        docs_url=None,  # /docs and /redoc from local assets: app/docs.py
        redoc_url=None,
    )
    app.state.service = service
    app.include_router(classify.router)
    app.include_router(monitoring.router)
    app.include_router(catalogue.router)
    app.include_router(explain.router)
    app.include_router(stats.router)
    app.include_router(v2.router)
    app.include_router(admin.router)
    install_docs(app)
    install_page(app)
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    _add_openapi_components(app, {**v2.openapi_components(), **admin.openapi_components()})
    return app


def _add_openapi_components(app: FastAPI, schemas: dict[str, Any]) -> None:
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = original()
            spec.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _create_or_exit() -> FastAPI:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return create_app()
    except SettingsError as exc:
        raise SystemExit(str(exc)) from None


app = _create_or_exit()
