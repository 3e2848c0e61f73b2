"""The Open Inference Protocol v2, transport-neutral: the served model found by name and version,
its metadata, the one input tensor checked and made an array (JSON numbers, the binary tensor data
extension's bytes, gRPC contents or raw bytes alike), the outputs asked for, and the outputs as
arrays and as the protocol's raw bytes.

REST (app/v2.py, app/v2_binary.py) and gRPC (app/grpc_server.py) both answer through these
functions, so a request gets the same checks, limits and messages on either transport; an error is
an APIError whose status the gRPC server maps to a status code (`grpc_code`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.engine import ModelRuntime, Ticket
from app.errors import APIError, model_not_found
from app.service import NotReadyError, Service
from app.verdict import Verdicts

SERVER_NAME = "dsphere"
SERVER_VERSION = "0.1.0"
# binary_tensor_data: Inference-Header-Content-Length, binary_data_size, binary_data(_output) (REST)
EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "onnxruntime_onnx"

DEFAULT_OUTPUTS = ("label", "angle_deg", "accepted", "reason")
ALL_OUTPUTS = {
    "label": "INT64",
    "angle_deg": "FP64",
    "accepted": "BOOL",
    "reason": "BYTES",
    "threshold_deg": "FP64",
    "probability": "FP64",
}
# The protocol's datatypes and their bytes per element (BYTES: 4-byte length + the bytes, each element).
DATATYPE_BYTES = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2,
                  "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BYTES": 0}
# Parameters of the extensions this server does not have: refused rather than silently ignored.
UNSUPPORTED_PARAMETERS = ("classification", "shared_memory_region", "shared_memory_byte_size",
                          "shared_memory_offset")


def served(svc: Service, name: str, version: str | None = None) -> ModelRuntime:
    """The served runtime if it is model `name` (and `version`, when given and not empty): 404 for
    another name or a version not loaded, 503 while not ready."""
    try:
        rt = svc.current()
    except NotReadyError as exc:
        if name == svc.settings.model_name:
            raise APIError(503, str(exc), {"Retry-After": "5"}) from None
        raise model_not_found(name) from None
    if rt.name != name:
        raise model_not_found(name)
    if version and version != rt.version:
        raise APIError(404, f"model '{name}' version '{version}' is not loaded; the version served is "
                            f"'{rt.version}'")
    return rt


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}


def model_metadata(rt: ModelRuntime) -> dict[str, Any]:
    """The served version's metadata: `versions` is what can be asked for (the version loaded)."""
    return {
        "name": rt.name,
        "versions": [rt.version],
        "platform": PLATFORM,
        "inputs": [{"name": rt.model.input_name, "datatype": "FP32", "shape": [-1, *rt.input_shape]}],
        "outputs": [{"name": n, "datatype": ALL_OUTPUTS[n], "shape": [-1]} for n in DEFAULT_OUTPUTS],
    }


@dataclass
class InputTensor:
    """One input as received: its data either `values` (JSON numbers, gRPC contents) or `raw` bytes."""

    name: str
    datatype: str
    shape: list[int]
    values: Any = None
    raw: bytes | None = None


def check_parameters(where: str, parameters: dict[str, Any] | None) -> None:
    """400 for a parameter of an extension the server does not have (classification, shared memory)."""
    for key in parameters or {}:
        if key in UNSUPPORTED_PARAMETERS:
            raise APIError(400, f"{where}: parameter '{key}' is not supported (extensions: {list(EXTENSIONS)})")


def input_array(inputs: list[InputTensor], rt: ModelRuntime, max_n: int) -> NDArray[np.float32]:
    """The one FP32 input [N, C, H, W] as an array, every check of the protocol and the service's limits."""
    if len(inputs) != 1:
        raise APIError(400, f"expected exactly one input tensor, got {len(inputs)}")
    t = inputs[0]
    if t.datatype not in DATATYPE_BYTES:
        raise APIError(400, f"input '{t.name}': unknown datatype {t.datatype}; the protocol's: {list(DATATYPE_BYTES)}")
    if t.datatype != "FP32":
        raise APIError(400, f"input '{t.name}': datatype must be FP32, got {t.datatype}")
    c, h, w = rt.input_shape
    if len(t.shape) != 4 or tuple(t.shape[1:]) != (c, h, w) or t.shape[0] < 1:
        raise APIError(400, f"input '{t.name}': shape must be [N, {c}, {h}, {w}] with N >= 1, got {t.shape}")
    n = t.shape[0]
    if n > max_n:
        raise APIError(413, f"input '{t.name}': batch of {n} exceeds the limit of {max_n}")
    expected = n * c * h * w
    arr = _from_raw(t, expected) if t.raw is not None else _from_values(t)
    if arr.size != expected:
        raise APIError(400, f"input '{t.name}': data has {arr.size} values, shape {t.shape} needs {expected}")
    arr = arr.reshape(n, c, h, w)
    lo, hi = rt.model.manifest.input.value_range
    if not np.isfinite(arr).all() or arr.min() < lo or arr.max() > hi:
        raise APIError(400, f"input '{t.name}': values must be finite and within [{lo:g}, {hi:g}]")
    return arr


def _from_raw(t: InputTensor, expected: int) -> NDArray[np.float32]:
    assert t.raw is not None
    if len(t.raw) != expected * 4:
        raise APIError(400, f"input '{t.name}': binary data has {len(t.raw)} bytes, shape {t.shape} of FP32 "
                            f"needs {expected * 4}")
    return np.frombuffer(t.raw, dtype="<f4").astype(np.float32)


def _from_values(t: InputTensor) -> NDArray[np.float32]:
    try:
        # Numbers only: numpy would also parse numeric strings ("0.5"), and makes an object array
        # of ints beyond 64 bits, whose float32 cast raises OverflowError.
        raw = np.asarray(t.values)
        if raw.dtype.kind not in "biuf":
            raise TypeError(f"data of dtype {raw.dtype}")
        return raw.astype(np.float32)
    except (ValueError, TypeError):
        raise APIError(400, f"input '{t.name}': data must be numbers (flat or nested)") from None


def requested_outputs(names: list[str] | None) -> list[str]:
    """The outputs asked for, else DEFAULT_OUTPUTS; 400 for a name the model has not."""
    wanted = list(names) if names else list(DEFAULT_OUTPUTS)
    unknown = [o for o in wanted if o not in ALL_OUTPUTS]
    if unknown:
        raise APIError(400, f"unknown output(s) {unknown}; available: {sorted(ALL_OUTPUTS)}")
    return wanted


def output_arrays(v: Verdicts) -> dict[str, NDArray[Any]]:
    """Every output of the verdicts, as arrays of the protocol's datatypes (reason: bytes objects). A row
    whose answer is withheld (reason query_history) has label -1 and NaN angle, threshold and
    probability (JSON: null)."""
    hidden = v.withheld
    return {
        "label": np.where(hidden, -1, v.labels).astype(np.int64),
        "angle_deg": np.where(hidden, np.nan, v.angles_deg).astype(np.float64),
        "accepted": v.accepted.astype(np.bool_),
        "reason": np.array([(r or "").encode() for r in v.reasons()], dtype=object),
        "threshold_deg": np.where(hidden, np.nan, v.thresholds_deg).astype(np.float64),
        "probability": np.where(hidden, np.nan, v.probabilities).astype(np.float64),
    }


def raw_bytes(datatype: str, arr: NDArray[Any]) -> bytes:
    """The protocol's raw form of a tensor: little-endian row-major; BYTES as 4-byte length + bytes each."""
    if datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in arr.tolist())
    dtype = {"INT64": "<i8", "FP64": "<f8", "BOOL": "?"}[datatype]
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def json_values(datatype: str, arr: NDArray[Any]) -> list[Any]:
    """A tensor's `data` in the JSON form (BYTES as UTF-8 strings)."""
    if datatype == "BYTES":
        return [b.decode() for b in arr.tolist()]
    values: list[Any] = arr.tolist()
    if datatype.startswith("FP") and np.isnan(arr).any():
        return [None if x != x else x for x in values]  # NaN (a withheld answer) is null in JSON
    return values


def npy(row: NDArray[np.float32]) -> bytes:
    """One input row ([C, H, W] float32) as a .npy file: what the quarantine keeps of a rejected one."""
    buf = io.BytesIO()
    np.save(buf, row, allow_pickle=False)
    return buf.getvalue()


async def classify(svc: Service, rt: ModelRuntime, x: NDArray[np.float32], ticket: Ticket,
                   request_id: str) -> Verdicts:
    """The verdicts on x through the service (query history, result cache, metrics, quarantine)."""
    return await svc.classify(rt, x, ticket, request_id, originals=lambda i: (npy(x[i]), ".npy"), batch=True)
