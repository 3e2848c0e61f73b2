"""The inference runtime: where a verified model.onnx runs, ONNX Runtime in fp32 (the reference), or
OpenVINO in fp32 or bf16 where this CPU and the installed packages support it (docs/SERVING.md,
"Paths and how the service picks one").

`open_runner` takes the requested (backend, precision) and answers a `Runner`: a callable
x -> (logits, cosines) on whichever inference runtime serves, with the `RuntimeInfo` it actually
runs with. Anything other than the
reference is served only when the version carries a precision record for it (app/manifest.py,
`PrecisionRecord`) measured on these very model bytes, meeting the contract's floors, and made
under the running service's conditions (this CPU's features, the installed runtime's version, the
served rho); when the record, the package or the CPU support is missing, or the conditions
differ, the reference runs instead and the reason is logged as a warning and reported
(`RuntimeInfo.fallback`, /healthz, the dsphere_inference_runtime_info metric).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from pydantic import ValidationError

from app.errors import validation_message
from app.manifest import OUTPUT_NAMES, REFERENCE, PrecisionRecord, precision_file

log = logging.getLogger("dsphere.runtimes")

Outputs = tuple[NDArray[np.float32], NDArray[np.float32]]
# CPU flags that decide which low-precision kernels exist (Linux /proc/cpuinfo names).
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products; without them bf16 is emulated


@cache
def _cpuinfo_first(key: str) -> str:
    """The value of the first `key` line of /proc/cpuinfo ("" where there is none or it cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.partition(":")[2].strip() for ln in lines if ln.startswith(key)), "")


def cpu_features() -> tuple[str, ...]:
    """RELEVANT_FLAGS this CPU has, from /proc/cpuinfo (empty where it cannot be read)."""
    flags = set(_cpuinfo_first("flags").split())
    return tuple(f for f in RELEVANT_FLAGS if f in flags)


def cpu_name() -> str:
    return _cpuinfo_first("model name") or "unknown"


@dataclass(frozen=True)
class Port:
    """One input or output of the graph as the runtime that serves it reads it."""

    name: str
    type: str  # ONNX notation: "tensor(float)"
    dims: tuple[int | str, ...]  # a dynamic dimension: its name where the graph names it, else "?"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]


@dataclass(frozen=True)
class RuntimeInfo:
    backend: str
    precision: str
    requested_backend: str
    requested_precision: str
    runtime_version: str
    cpu_features: tuple[str, ...] = field(default_factory=cpu_features)
    fallback: str | None = None  # why the requested path is not the one running
    # where it runs: ONNX Runtime's execution providers in use, or "openvino:<device>" for each OpenVINO device
    providers: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"{self.backend}-{self.precision}"


@dataclass
class Runner:
    """Runs the model: __call__(x [N, C, H, W] float32) -> (logits, cosines), on the one session its
    runtime built; `signature` is that session's view of the graph."""

    info: RuntimeInfo
    run: Callable[[NDArray[np.float32]], Outputs]
    signature: Signature

    def __call__(self, x: NDArray[np.float32]) -> Outputs:
        return self.run(x)


class RuntimeUnavailable(Exception):
    """The requested path cannot run here; the message says why (one line)."""


class ModelUnloadable(Exception):
    """The reference runtime cannot load the model at all; the message says why (one line)."""


def choose_providers(wanted: Sequence[str]) -> list[str]:
    """`wanted` filtered to what this onnxruntime build offers, CPU always last as fallback."""
    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if missing:
        log.info("execution provider(s) not available in this onnxruntime build, skipped: %s", missing)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _ort_port(arg: Any) -> Port:
    shape = arg.shape if isinstance(arg.shape, list | tuple) else ()
    dims = tuple(d if isinstance(d, int) else str(d or "?") for d in shape)
    return Port(arg.name, arg.type, dims)


def onnxruntime_runner(model: bytes | str, requested: tuple[str, str] = REFERENCE, threads: int = 0,
                       providers: Sequence[str] = ("CPUExecutionProvider",), fallback: str | None = None,
                       quiet: bool = False) -> Runner:
    """The fp32 reference: an ONNX Runtime session on `model` (bytes or a path) with the first of
    `providers` this build offers (quiet: its warnings not logged); ModelUnloadable where ONNX Runtime
    cannot load it."""
    options = ort.SessionOptions()
    if quiet:
        options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=choose_providers(providers))
    except Exception as exc:  # onnxruntime raises its own (untyped) exceptions
        raise ModelUnloadable(f"ONNX Runtime cannot load it ({exc})") from None
    inputs = session.get_inputs()
    input_name = inputs[0].name if inputs else ""
    names = list(OUTPUT_NAMES)

    def run(x: NDArray[np.float32]) -> Outputs:
        logits, cosines = session.run(names, {input_name: x})
        return logits, cosines

    info = RuntimeInfo(*REFERENCE, *requested, runtime_version=ort.__version__, fallback=fallback,
                       providers=tuple(session.get_providers()))
    signature = Signature(tuple(map(_ort_port, inputs)), tuple(map(_ort_port, session.get_outputs())))
    return Runner(info, run, signature)


def openvino_version() -> str:
    """The installed OpenVINO's version; RuntimeUnavailable where the package is missing."""
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable("the openvino package is not installed") from None
    return str(ov.__version__)


def _openvino_port(port: Any) -> Port:
    import openvino as ov

    element = port.get_element_type()
    kind = "tensor(float)" if element == ov.Type.f32 else f"tensor({element.get_type_name()})"
    dims = tuple(d.get_length() if d.is_static else "?" for d in port.get_partial_shape())
    return Port(port.get_any_name(), kind, dims)


def openvino_runner(model_bytes: bytes, precision: str, threads: int) -> Runner:
    """model.onnx compiled by OpenVINO for this CPU in `precision`; RuntimeUnavailable where it cannot be."""
    openvino_version()
    import openvino as ov

    core = ov.Core()
    if precision == "bf16":
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        native = [f for f in BF16_FLAGS if f in cpu_features()]
        if "BF16" not in caps or not native:
            raise RuntimeUnavailable(f"this CPU has no native bf16 ({', '.join(BF16_FLAGS)} absent; "
                                     f"OpenVINO capabilities {list(caps)})")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = core.compile_model(core.read_model(model_bytes), "CPU", config)
        outputs = [compiled.output(name) for name in OUTPUT_NAMES]
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
        raise RuntimeUnavailable(f"OpenVINO cannot compile it ({str(exc).splitlines()[0][:200]})") from None
    local = threading.local()  # an infer request is not thread-safe: one per calling thread

    def run(x: NDArray[np.float32]) -> Outputs:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        result = request.infer({0: x})
        return np.array(result[outputs[0]], np.float32), np.array(result[outputs[1]], np.float32)

    devices = tuple(f"openvino:{d}" for d in compiled.get_property("EXECUTION_DEVICES"))
    info = RuntimeInfo("openvino", precision, "openvino", precision, ov.__version__, providers=devices)
    signature = Signature(tuple(map(_openvino_port, compiled.inputs)), tuple(map(_openvino_port, compiled.outputs)))
    return Runner(info, run, signature)


def read_record(version_dir: Path, backend: str, precision: str, sha256: str) -> PrecisionRecord:
    """The version's record of this path, checked against the model bytes and the contract."""
    path = version_dir / precision_file(backend, precision)
    try:
        record = PrecisionRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise RuntimeUnavailable(f"{path} is missing: this path's agreement with the fp32 reference "
                                 "was never measured (python -m training precision)") from None
    except (OSError, ValidationError) as exc:
        why = validation_message(exc.errors()) if isinstance(exc, ValidationError) else str(exc)
        raise RuntimeUnavailable(f"{path} is not a valid precision record: {why}") from None
    if record.sha256 != sha256 or (record.backend, record.precision) != (backend, precision):
        raise RuntimeUnavailable(f"{path} was measured on other model bytes or another path")
    failures = record.failures()
    if failures:
        raise RuntimeUnavailable(f"{path} misses the parity contract: {'; '.join(failures)}")
    return record


def check_conditions(version_dir: Path, record: PrecisionRecord, rho: float) -> None:
    """RuntimeUnavailable where this service runs under other conditions than the record was measured in."""
    differ = record.other_conditions(cpu_features(), openvino_version(), rho)
    if differ:
        raise RuntimeUnavailable(f"{version_dir / precision_file(record.backend, record.precision)} was measured "
                                 f"under other conditions: {'; '.join(differ)}")


def open_runner(version_dir: Path, model_bytes: bytes, sha256: str, requested: tuple[str, str], *, threads: int = 0,
                rho: float | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Runner:
    """The requested path when it can run here with a passing record made under these conditions (rho: the
    served one; None: the record's, i.e. the manifest's), else the reference (warned). Only the runtime that
    serves builds a session. ModelUnloadable where even the reference cannot load the model."""
    backend, precision = requested
    if requested == REFERENCE:
        return onnxruntime_runner(model_bytes, requested, threads, providers)
    try:
        if backend != "openvino":
            raise RuntimeUnavailable(f"{backend} has no {precision} path here; bf16 runs on openvino")
        record = read_record(version_dir, backend, precision, sha256)
        check_conditions(version_dir, record, record.rho if rho is None else rho)
        return openvino_runner(model_bytes, precision, threads)
    except RuntimeUnavailable as exc:
        log.warning("%s/%s: %s-%s unavailable, serving the fp32 ONNX Runtime reference: %s",
                    version_dir.parent.name, version_dir.name, backend, precision, exc)
        return onnxruntime_runner(model_bytes, requested, threads, providers, fallback=str(exc))
