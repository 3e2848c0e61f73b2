"""Response and request models of the HTTP API (they are the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.manifest import AngleHistogram, Calibration, ManifestMetrics
from app.verdict import ReasonName, VerdictName


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, in one sentence")


class V2Error(BaseModel):
    error: str


class ModelRef(BaseModel):
    name: str
    version: str


WITHHELD = "; null when the answer is withheld (reason query_history: an attack query gets no answer from the model)"


class Classification(BaseModel):
    label: int | None = Field(description="predicted class index (argmax of logits)" + WITHHELD)
    class_name: str | None = Field(description="the label's name" + WITHHELD)
    probability: float | None = Field(description="softmax probability of the label" + WITHHELD)
    angle_deg: float | None = Field(description="geodesic angle to the predicted class weight, degrees" + WITHHELD)
    threshold_deg: float | None = Field(description="rho * (angle_mean_deg + angle_std_deg) of the label" + WITHHELD)
    verdict: VerdictName = Field(
        description="reject iff angle_deg > threshold_deg, or the query-history detector judged the input part of "
        "a query attack")
    reason: ReasonName | None = Field(
        None, description="why it is rejected: angle (angle_deg > threshold_deg) or query_history (the input is "
        "close to a recent query: an attack in progress, docs/QUERY_HISTORY.md; the model's outputs are then "
        "withheld, null); null when accepted")
    model: ModelRef = Field(description="the version that produced this result")
    request_id: str


class BatchClassification(BaseModel):
    results: list[Classification]


class ClassProbability(BaseModel):
    label: int
    class_name: str
    probability: float = Field(description="softmax probability")


class ModelInput(BaseModel):
    """The image as the model receives it: after the service's decoding, conversion and resizing."""

    shape: tuple[int, int, int] = Field(description="(C, H, W)")
    pixels: list[int] = Field(description="C*H*W values in 0..255, row-major: the model's input times 255")
    format: str = Field(description="the uploaded image's format, as read from its bytes")
    original_size: tuple[int, int] = Field(description="(width, height) as uploaded")


class Explanation(Classification):
    """What /classify answers, plus what a person needs to see why (the page draws it)."""

    top_classes: list[ClassProbability] = Field(
        description="the three most probable classes, most probable first; empty when the answer is withheld")
    angle_mean_deg: float | None = Field(description="the label's mean training angle, from the manifest" + WITHHELD)
    angle_std_deg: float | None = Field(description="the label's standard deviation of that angle" + WITHHELD)
    rho: float = Field(description="threshold_deg = rho * (angle_mean_deg + angle_std_deg)")
    input: ModelInput


class ClassCounts(BaseModel):
    class_name: str
    accepted: int
    rejected: int


class RecentInterval(BaseModel):
    seconds_ago: float = Field(description="how long before the answer this interval ended")
    duration_s: float
    requests: int = Field(description="requests to the classifying endpoints")
    errors: int = Field(description="those answered 4xx or 5xx")
    classified: int = Field(description="inputs classified (a batch counts each image)")
    rejected: int
    attack_queries: int = Field(0, description="inputs the query-history detector judged attack queries")


class RecentStats(BaseModel):
    """The last minutes, from the service's own counters (those of GET /metrics)."""

    window_s: float = Field(description="the window the service keeps, in seconds")
    covered_s: float = Field(description="seconds these figures cover: window_s, or less just after start")
    requests: int = Field(description="requests to /classify, /classify/batch, /explain and v2 infer")
    errors: int = Field(description="those answered 4xx or 5xx")
    classified: int
    rejected: int
    rejection_ratio: float | None = Field(description="rejected / classified; null when nothing was classified")
    attack_queries: int = Field(0, description="inputs the query-history detector judged attack queries "
                                "(rejected or flagged), near-copies of recent queries")
    per_class: list[ClassCounts] = Field(description="by predicted class, over every model served")
    intervals: list[RecentInterval] = Field(description="the window in equal intervals, oldest first")


class InferenceRuntime(BaseModel):
    """What runs the served model: backend and precision, as asked and as running."""

    backend: Literal["onnxruntime", "openvino"]
    precision: Literal["fp32", "bf16"]
    requested_backend: str
    requested_precision: str
    runtime_version: str = Field(description="the backend package's version")
    cpu_features: list[str] = Field(description="the CPU flags that decide which low-precision kernels exist")
    fallback: str | None = Field(description="why the requested path is not the one running; null when it is")


class QueryHistoryHealth(BaseModel):
    """The query-history detector: whether it judges inputs now."""

    action: Literal["reject", "flag", "off"]
    store: Literal["memory", "shared", "redis"] = Field(
        description="memory: this process's; shared: one table every worker of this host maps; redis")
    status: Literal["ok", "unavailable", "off"] = Field(
        description="unavailable: its store cannot be reached, inputs are judged by the per-input verdict alone")
    error: str | None = Field(None, description="why the store is unavailable")


class Health(BaseModel):
    status: Literal["ok"]
    model: ModelRef | None = Field(None, description="the served version; null until it is loaded")
    runtime: InferenceRuntime | None = Field(None, description="what runs it; null until it is loaded")
    query_history: QueryHistoryHealth | None = Field(None, description="the query-history detector")


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
    angle_mean_deg: list[float] = Field(description="per class mean training angle")
    angle_std_deg: list[float] = Field(description="per class standard deviation of that angle")
    angle_histogram: AngleHistogram | None = Field(
        description="per class training angles in bins; null for manifests exported before it was recorded"
    )


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
    data: list[Any] | None = Field(
        None, description="row-major values (flat or nested); absent when parameters.binary_data_size says the "
        "tensor's bytes follow the JSON (binary tensor data extension)")
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


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


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
