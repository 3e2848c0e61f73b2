"""What the routes get from FastAPI's dependency injection: the service, and the runtime it serves.

    async def route(svc: ServiceDep, rt: ServedRuntime) -> ...

`ServedRuntime` raises NotReadyError (503 + Retry-After) while no model is loaded and warmed.
Both are `async def`: FastAPI would run a plain `def` dependency in its thread pool, a thread
hop on every request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.engine import ModelRuntime
from app.service import Service


async def get_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


ServiceDep = Annotated[Service, Depends(get_service)]


async def served_runtime(svc: ServiceDep) -> ModelRuntime:
    return svc.current()


ServedRuntime = Annotated[ModelRuntime, Depends(served_runtime)]


def request_id_of(request: Request) -> str:
    """The request's id (app/middleware.py: the client's X-Request-ID if well-formed, else a new one)."""
    rid: str = request.state.request_id
    return rid
