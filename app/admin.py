"""POST /admin/reload: load another version and swap it in atomically.

Disabled (503) unless DSPHERE_ADMIN_TOKEN is set; requires `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Request

from app.errors import APIError
from app.schemas import ModelRef, ReloadRequest, ReloadResponse, error_responses
from app.service import Service

log = logging.getLogger("dsphere.admin")
router = APIRouter(prefix="/admin", tags=["admin"])


def _authorize(request: Request, token: str | None) -> None:
    if token is None:
        raise APIError(503, "admin endpoint disabled: set DSPHERE_ADMIN_TOKEN to enable it")
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise APIError(401, "invalid bearer token", {"WWW-Authenticate": "Bearer"})


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses=error_responses(401, 404, 409, 422, 503),
    summary="Load a version (verified, warmed) and swap it in; on failure the old one stays",
)
async def reload(request: Request, body: ReloadRequest) -> ReloadResponse:
    svc: Service = request.app.state.service
    _authorize(request, svc.settings.admin_token)
    name = body.name or (svc.runtime.name if svc.runtime is not None else svc.settings.model_name)
    old, new = await svc.reload(name, body.version)  # ModelStoreError -> 404/409, old model kept
    log.info("reloaded %s/%s (was %s)", new.name, new.version, f"{old.name}/{old.version}" if old else "none")
    return ReloadResponse(
        status="reloaded",
        previous=ModelRef(name=old.name, version=old.version) if old else None,
        model=ModelRef(name=new.name, version=new.version),
        sha256=new.model.sha256,
    )
