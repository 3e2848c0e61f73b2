"""GET /stats: the last minutes (requests, rejection ratio, per class) from the service's own
counters (app/recent.py); the page's live panel polls it."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServiceDep
from app.schemas import RecentStats

router = APIRouter()


@router.get("/stats", response_model=RecentStats,
            summary="The last minutes: requests, rejection ratio, per class (from the service's own counters)")
async def stats(svc: ServiceDep) -> RecentStats:
    rt = svc.runtime
    return svc.recent.stats(rt.model.manifest.class_names if rt is not None else ())
