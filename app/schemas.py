"""Response and request models of the HTTP API (they are the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.manifest import Calibration, ManifestMetrics
from app.verdict import VerdictName


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, in one sentence")


class V2Error(BaseModel):
    error: str


class ModelRef(BaseModel):
    name: str
    version: str


class Classification(BaseModel):
    label: int = Field(description="predicted class index (argmax of logits)")
    class_name: str
    probability: float = Field(description="softmax probability of the label")
    angle_deg: float = Field(description="geodesic angle to the predicted class weight, degrees")
    threshold_deg: float = Field(description="rho * (angle_mean_deg + angle_std_deg) of the label")
    verdict: VerdictName = Field(description="reject iff angle_deg > threshold_deg")
    model: ModelRef = Field(description="the version that produced this result")
    request_id: str


class BatchClassification(BaseModel):
    results: list[Classification]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    model: ModelRef


class ManifestSummary(BaseModel):
    version: str
    created_at: datetime
    sha256: str
    class_names: list[str]
    input_shape: tuple[int, int, int]
    rho: float = Field(description="rho the service applies (manifest value unless DSPHERE_RHO overrides)")
    manifest_rho: float
    calibration: Calibration
    metrics: ManifestMetrics


class ModelSummary(BaseModel):
    name: str
    versions: list[str]
    latest: str | None
    served_version: str | None = Field(description="version being served, if this is the served model")


class ModelList(BaseModel):
    models: list[ModelSummary]


class ModelDetail(ModelSummary):
    manifest: ManifestSummary | None = Field(description="of the served version, else of the latest one")
    manifest_error: str | None = None
    provider: str | None = None


class ReloadRequest(BaseModel):
    version: str = Field("latest", max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    name: str | None = Field(None, max_length=128, pattern=r"^[a-z0-9][a-z0-9._-]*$")


class ReloadResponse(BaseModel):
    status: Literal["reloaded"]
    previous: ModelRef | None
    model: ModelRef
    sha256: str


# --- Open Inference Protocol v2 ---------------------------------------------------------


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[V2Tensor]


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for FastAPI routes: each code documented with ErrorResponse."""
    text = {
        400: "undecodable, truncated or malformed input",
        401: "missing or wrong bearer token",
        403: "forbidden",
        404: "unknown model or version",
        409: "the requested version failed verification; the old model is still served",
        413: "body or image too large",
        415: "unsupported media type",
        422: "missing or invalid field",
        503: "not ready, shutting down, or queue full (then with Retry-After)",
    }
    return {c: {"model": ErrorResponse, "description": text.get(c, "error")} for c in codes}


def v2_error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": V2Error, "description": "error"} for c in codes}
