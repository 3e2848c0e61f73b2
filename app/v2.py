"""Open Inference Protocol (KServe v2) REST endpoints; errors are {"error": "..."}.

Server: GET /v2 (name, version, extensions), /v2/health/live, /v2/health/ready. Model: metadata and
readiness for the name and for each version (`/v2/models/{name}[/versions/{version}]`,
`.../ready`), inference at `.../infer`. A version other than the one loaded is a 404; the metadata's
`versions` lists the one that can be asked for.

Input: one FP32 tensor [N, C, H, W] (any name), values in the manifest's value_range, as JSON
`data` (flat row-major or nested) or as bytes after the JSON (the binary tensor data extension,
app/v2_binary.py). Outputs (all [N]): `label` INT64, `angle_deg` FP64, `accepted` BOOL, `reason`
BYTES (why a row is rejected: "angle" or "query_history"; "" when accepted); on request (`outputs`
field) also `threshold_deg` FP64 and `probability` FP64; each as JSON or as bytes
(`binary_data`, `binary_data_output`). The checks, limits and messages are app/v2_tensors.py's,
shared with the gRPC server (app/grpc_server.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.deps import ServiceDep, request_id_of
from app.schemas import (
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    v2_error_responses,
)
from app.service import NotReadyError
from app.uploads import read_body
from app.v2_binary import HEADER_LENGTH, inflate, parse_request, response_body
from app.v2_tensors import (
    ALL_OUTPUTS,
    DEFAULT_OUTPUTS,
    classify,
    input_array,
    model_metadata,
    output_arrays,
    served,
    server_metadata,
)

__all__ = ["ALL_OUTPUTS", "DEFAULT_OUTPUTS", "router", "openapi_components"]

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])


@router.get("", response_model=V2ServerMetadata)
async def server() -> dict[str, Any]:
    return server_metadata()


@router.get("/health/live", response_model=V2Live)
async def live() -> V2Live:
    return V2Live(live=True)


@router.get("/health/ready", response_model=V2Ready, responses={503: {"model": V2Ready}})
async def ready(svc: ServiceDep) -> V2Ready | JSONResponse:
    try:
        svc.current()
    except NotReadyError:
        return JSONResponse({"ready": False}, status_code=503)
    return V2Ready(ready=True)


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=v2_error_responses(404, 503))
async def metadata(svc: ServiceDep, name: str) -> dict[str, Any]:
    return model_metadata(served(svc, name))


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata,
            responses=v2_error_responses(404, 503))
async def version_metadata(svc: ServiceDep, name: str, version: str) -> dict[str, Any]:
    return model_metadata(served(svc, name, version))


@router.get("/models/{name}/ready", response_model=V2ModelReady, responses=v2_error_responses(404, 503))
async def model_ready(svc: ServiceDep, name: str) -> V2ModelReady:
    served(svc, name)
    return V2ModelReady(name=name, ready=True)


@router.get("/models/{name}/versions/{version}/ready", response_model=V2ModelReady,
            responses=v2_error_responses(404, 503))
async def version_ready(svc: ServiceDep, name: str, version: str) -> V2ModelReady:
    served(svc, name, version)
    return V2ModelReady(name=name, ready=True)


_INFER: dict[str, Any] = {
    "response_model": V2InferResponse,
    "response_model_exclude_none": True,
    "responses": {
        **v2_error_responses(400, 404, 413, 415, 503),
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
              "description": "JSON; or, with binary outputs, JSON then the outputs' bytes "
                             "(Inference-Header-Content-Length: the JSON's length)"},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}


@router.post("/models/{name}/infer", **_INFER)
async def infer(request: Request, svc: ServiceDep, name: str) -> Response:
    return await _infer(request, svc, name, None)


@router.post("/models/{name}/versions/{version}/infer", **_INFER)
async def version_infer(request: Request, svc: ServiceDep, name: str, version: str) -> Response:
    return await _infer(request, svc, name, version)


async def _infer(request: Request, svc: ServiceDep, name: str, version: str | None) -> Response:
    rt, rid, limit = served(svc, name, version), request_id_of(request), svc.settings.max_batch_upload_bytes
    with rt.ticket() as ticket:  # admitted now: a reload while the body is read still runs it on rt
        body = inflate(await read_body(request, limit), request.headers.get("content-encoding"), limit)
        req = parse_request(body, request.headers.get(HEADER_LENGTH))
        x = input_array(req.inputs, rt, svc.settings.max_batch_files)
        v = await classify(svc, rt, x, ticket, rid)
    head = {"model_name": rt.name, "model_version": rt.version, "id": req.id or rid}
    content, media_type, headers = response_body(head, req, output_arrays(v))
    return Response(content, media_type=media_type, headers=headers)


def openapi_components() -> dict[str, Any]:
    """Schemas referenced by the infer requestBody (parsed by hand, so FastAPI does not list them)."""
    schema = V2InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"V2InferRequest": schema, **defs}
