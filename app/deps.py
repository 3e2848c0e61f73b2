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
from app.errors import APIError
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


async def known_query_only(request: Request) -> None:
    """Every route's query parameters are the ones it declares: any other is a 400 naming them
    (e.g. `/classify?model=x`: /classify takes none; the page's POST /explain takes `model`)."""
    if not request.scope.get("query_string"):
        return
    route = request.scope.get("route")
    known = _declared_query(route)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no query parameters"
        raise APIError(400, f"unknown query parameter(s) {', '.join(unknown)}; this route takes {takes}")


_DECLARED: dict[int, frozenset[str]] = {}


def _declared_query(route: object) -> frozenset[str]:
    """The query parameters a FastAPI route declares (its own and its dependencies'), once per route."""
    key = id(route)
    if key not in _DECLARED:
        names: set[str] = set()
        todo = [getattr(route, "dependant", None)]
        while todo:
            dependant = todo.pop()
            if dependant is not None:
                names |= {p.alias for p in dependant.query_params}
                todo += dependant.dependencies
        _DECLARED[key] = frozenset(names)
    return _DECLARED[key]
