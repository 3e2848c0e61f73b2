"""Open Inference Protocol (KServe v2) endpoints; errors are {"error": "..."}.

Input: one FP32 tensor [N, C, H, W] (any name; flat row-major or nested `data`),
values in the manifest's value_range. Outputs (all [N]): `label` INT64,
`angle_deg` FP64, `accepted` BOOL, `reason` BYTES (why a row is rejected: "angle" or
"query_history"; "" when accepted); on request (`outputs` field) also `threshold_deg` FP64
and `probability` FP64.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.deps import ServiceDep, request_id_of
from app.engine import ModelRuntime
from app.errors import APIError, model_not_found, validation_message
from app.model_store import list_versions
from app.schemas import (
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2Tensor,
    V2TensorMeta,
    v2_error_responses,
)
from app.service import NotReadyError, Service
from app.uploads import read_body

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

DEFAULT_OUTPUTS = ("label", "angle_deg", "accepted", "reason")
ALL_OUTPUTS = {
    "label": "INT64",
    "angle_deg": "FP64",
    "accepted": "BOOL",
    "reason": "BYTES",
    "threshold_deg": "FP64",
    "probability": "FP64",
}


def _model(svc: Service, name: str) -> ModelRuntime:
    """The served runtime if it is model `name`: 404 for another name, 503 while not ready."""
    try:
        rt = svc.current()
    except NotReadyError as exc:
        if name == svc.settings.model_name:
            raise APIError(503, str(exc), {"Retry-After": "5"}) from None
        raise model_not_found(name) from None
    if rt.name != name:
        raise model_not_found(name)
    return rt


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
async def metadata(svc: ServiceDep, name: str) -> V2ModelMetadata:
    rt = _model(svc, name)
    versions = list_versions(svc.settings.model_store, name) or [rt.version]
    return V2ModelMetadata(
        name=name,
        versions=versions,
        platform="onnxruntime_onnx",
        inputs=[V2TensorMeta(name=rt.model.input_name, datatype="FP32", shape=[-1, *rt.input_shape])],
        outputs=[V2TensorMeta(name=n, datatype=ALL_OUTPUTS[n], shape=[-1]) for n in DEFAULT_OUTPUTS],
    )


@router.get("/models/{name}/ready", response_model=V2ModelReady, responses=v2_error_responses(404, 503))
async def model_ready(svc: ServiceDep, name: str) -> V2ModelReady:
    _model(svc, name)
    return V2ModelReady(name=name, ready=True)


def _tensor(req: V2InferRequest, rt: ModelRuntime, max_n: int) -> np.ndarray:
    if len(req.inputs) != 1:
        raise APIError(400, f"expected exactly one input tensor, got {len(req.inputs)}")
    t = req.inputs[0]
    if t.datatype != "FP32":
        raise APIError(400, f"input '{t.name}': datatype must be FP32, got {t.datatype}")
    c, h, w = rt.input_shape
    if len(t.shape) != 4 or tuple(t.shape[1:]) != (c, h, w) or t.shape[0] < 1:
        raise APIError(400, f"input '{t.name}': shape must be [N, {c}, {h}, {w}] with N >= 1, got {t.shape}")
    n = t.shape[0]
    if n > max_n:
        raise APIError(413, f"input '{t.name}': batch of {n} exceeds the limit of {max_n}")
    try:
        # Numbers only: numpy would also parse numeric strings ("0.5"), and makes an object array
        # of ints beyond 64 bits, whose float32 cast raises OverflowError.
        raw = np.asarray(t.data)
        if raw.dtype.kind not in "biuf":
            raise TypeError(f"data of dtype {raw.dtype}")
        arr = raw.astype(np.float32)
    except (ValueError, TypeError):
        raise APIError(400, f"input '{t.name}': data must be numbers (flat or nested)") from None
    expected = n * c * h * w
    if arr.size != expected:
        raise APIError(400, f"input '{t.name}': data has {arr.size} values, shape {t.shape} needs {expected}")
    arr = arr.reshape(n, c, h, w)
    lo, hi = rt.model.manifest.input.value_range
    if not np.isfinite(arr).all() or arr.min() < lo or arr.max() > hi:
        raise APIError(400, f"input '{t.name}': values must be finite and within [{lo:g}, {hi:g}]")
    return arr


@router.post(
    "/models/{name}/infer",
    response_model=V2InferResponse,
    response_model_exclude_none=True,
    responses=v2_error_responses(400, 404, 413, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}}},
        }
    },
)
async def infer(request: Request, svc: ServiceDep, name: str) -> V2InferResponse:
    rt, rid = _model(svc, name), request_id_of(request)
    with rt.ticket() as ticket:  # admitted now: a reload while the body is read still runs it on rt
        req = _infer_request(await read_body(request, svc.settings.max_batch_upload_bytes))
        wanted = _outputs(req)
        x = _tensor(req, rt, svc.settings.max_batch_files)
        v = await svc.classify(rt, x, ticket, rid, originals=lambda i: (_npy(x[i]), ".npy"), batch=True)
    cols: dict[str, list[Any]] = {
        "label": v.labels.tolist(),
        "angle_deg": v.angles_deg.tolist(),
        "accepted": v.accepted.tolist(),
        "reason": [r or "" for r in v.reasons()],
        "threshold_deg": v.thresholds_deg.tolist(),
        "probability": v.probabilities.tolist(),
    }
    n = len(v.labels)
    return V2InferResponse(
        model_name=rt.name,
        model_version=rt.version,
        id=req.id or rid,
        outputs=[V2Tensor(name=o, datatype=ALL_OUTPUTS[o], shape=[n], data=cols[o]) for o in wanted],
    )


def _infer_request(body: bytes) -> V2InferRequest:
    try:
        payload: Any = json.loads(body)
        return V2InferRequest.model_validate(payload)
    except RecursionError:  # json.loads of arrays/objects nested thousands deep
        raise APIError(400, "invalid inference request: JSON nested too deeply") from None
    except ValidationError as exc:  # the first error
        raise APIError(400, f"invalid inference request: {validation_message(exc.errors()[:1])}") from None
    except ValueError:
        raise APIError(400, "invalid inference request: body is not valid JSON") from None


def _outputs(req: V2InferRequest) -> list[str]:
    """The outputs asked for (`outputs`), else DEFAULT_OUTPUTS."""
    wanted = [o.name for o in req.outputs] if req.outputs else list(DEFAULT_OUTPUTS)
    unknown = [o for o in wanted if o not in ALL_OUTPUTS]
    if unknown:
        raise APIError(400, f"unknown output(s) {unknown}; available: {sorted(ALL_OUTPUTS)}")
    return wanted


def _npy(row: np.ndarray) -> bytes:
    """One input row ([C, H, W] float32) as a .npy file: what the quarantine keeps of a rejected one."""
    buf = io.BytesIO()
    np.save(buf, row, allow_pickle=False)
    return buf.getvalue()


def openapi_components() -> dict[str, Any]:
    """Schemas referenced by the infer requestBody (parsed by hand, so FastAPI does not list them)."""
    schema = V2InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"V2InferRequest": schema, **defs}
