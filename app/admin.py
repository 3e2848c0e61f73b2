"""POST /admin/reload: load another version and swap it in atomically.

Disabled (503) unless DSPHERE_ADMIN_TOKEN is set; requires `Authorization: Bearer <token>`.
The token is checked BEFORE the body is read, and the body is read under a small cap, so an
unauthenticated client cannot make the server buffer a large body.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from app.deps import ServiceDep
from app.errors import APIError, location, validation_message
from app.schemas import ModelRef, ReloadRequest, ReloadResponse, error_responses
from app.uploads import read_body

log = logging.getLogger("dsphere.admin")
router = APIRouter(prefix="/admin", tags=["admin"])

MAX_BODY_BYTES = 4096  # {"name": ..., "version": ...} is a few dozen bytes


def _authorize(request: Request, token: str | None) -> None:
    if token is None:
        raise APIError(503, "admin endpoint disabled: set DSPHERE_ADMIN_TOKEN to enable it")
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise APIError(401, "invalid bearer token", {"WWW-Authenticate": "Bearer"})


async def _reload_request(request: Request) -> ReloadRequest:
    raw = await read_body(request, MAX_BODY_BYTES)
    try:
        return ReloadRequest.model_validate_json(raw)
    except ValidationError as exc:  # the first error, located as FastAPI locates a body's ("body.version")
        raise APIError(422, validation_message(exc.errors()[:1], lambda e: location(e, ("body",)))) from None


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses=error_responses(401, 404, 409, 413, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReloadRequest"}}},
        }
    },
    summary="Load a version (verified, warmed) and swap it in; on failure the old one stays",
)
async def reload(request: Request, svc: ServiceDep) -> ReloadResponse:
    _authorize(request, svc.settings.admin_token)
    body = await _reload_request(request)
    name = body.name or (svc.runtime.name if svc.runtime is not None else svc.settings.model_name)
    old, new = await svc.reload(name, body.version)  # ModelStoreError -> 404/409, old model kept
    log.info("reloaded %s/%s (was %s)", new.name, new.version, f"{old.name}/{old.version}" if old else "none")
    return ReloadResponse(
        status="reloaded",
        previous=ModelRef(name=old.name, version=old.version) if old else None,
        model=ModelRef(name=new.name, version=new.version),
        sha256=new.model.sha256,
    )


def openapi_components() -> dict[str, Any]:
    """The reload requestBody schema (parsed by hand, so FastAPI does not list it)."""
    return {"ReloadRequest": ReloadRequest.model_json_schema(ref_template="#/components/schemas/{model}")}
