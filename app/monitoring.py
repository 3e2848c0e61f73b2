"""What probes and Prometheus read: GET /healthz (liveness), GET /readyz (the model loaded and
warmed) and GET /metrics (app/metrics.py). GET /stats, the page's view of the same counters, is
app/stats.py."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import Response

from app.deps import ServedRuntime, ServiceDep
from app.metrics import CONTENT_TYPE
from app.schemas import Health, InferenceRuntime, ModelRef, Ready, error_responses

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers; what it serves, on what")
async def healthz(svc: ServiceDep) -> Health:
    rt, history = svc.runtime, svc.history_health()
    if rt is None:
        return Health(status="ok", query_history=history)
    info = rt.model.runner.info
    return Health(status="ok", model=ModelRef(name=rt.name, version=rt.version),
                  runtime=InferenceRuntime(**asdict(info)), query_history=history)


@router.get("/readyz", response_model=Ready, responses=error_responses(503), summary="Model loaded and warmed")
async def readyz(rt: ServedRuntime) -> Ready:
    return Ready(status="ready", model=ModelRef(name=rt.name, version=rt.version))


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)")
async def metrics(svc: ServiceDep) -> Response:
    await svc.update_history_gauges()
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE)
