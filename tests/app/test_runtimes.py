"""Serving paths (app/runtimes.py): the fp32 ONNX Runtime reference, OpenVINO behind a precision
record, and the fallback to the reference, with its reason, wherever the record, the package or
the CPU support is missing. On the fixture model of support/fake_store.py, with real runtimes."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app import runtimes
from app.manifest import MIN_BORDERLINE_FLOOR, MIN_CLEAN_AGREEMENT, PrecisionRecord, precision_file
from app.model_store import load_version
from app.settings import SettingsError, load_settings
from support.fake_store import NAME, prototype


def prototypes(*ks: int) -> np.ndarray:
    """The fixture's class prototypes as the model takes them: float32 [N, 1, 28, 28] in [0, 1]."""
    return np.stack([prototype(k) for k in ks]).astype(np.float32)[:, None] / 255.0

HAS_BF16 = bool(set(runtimes.BF16_FLAGS) & set(runtimes.cpu_features()))


def _openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _runtime_version() -> str:
    try:
        return runtimes.openvino_version()
    except runtimes.RuntimeUnavailable:
        return "not installed"


def write_record(vdir: Path, precision: str = "bf16", **changes: Any) -> dict[str, Any]:
    """A precision record for vdir's model.onnx meeting the contract (figures as given), measured under
    this service's conditions (this CPU's features, the installed OpenVINO, the manifest's rho) on
    another CPU model."""
    manifest = json.loads((vdir / "manifest.json").read_text())
    agreement = {"n": 100, "label": 1.0, "verdict": 1.0, "outcome": 1.0, "max_abs_logit_diff": 0.01}
    record: dict[str, Any] = {
        "name": manifest["name"], "version": manifest["version"], "sha256": manifest["sha256"],
        "backend": "openvino", "precision": precision, "runtime_version": _runtime_version(),
        "cpu": "another CPU model", "cpu_features": list(runtimes.cpu_features()), "rho": manifest["rho"],
        "clean": {"inputs": "test", **agreement}, "adversarial": {"inputs": "adversarial", **agreement},
        "borderline": {"inputs": "borderline", **agreement}, "borderline_floor": MIN_BORDERLINE_FLOOR,
        "borderline_file": "precision/none.npz",
        "robustness": {"n_examples": 100, "attacks": ["pgd-100"], "attacks_on_path": [], "not_judged": [],
                       "reference_robust_accuracy": 0.7, "reference_defended_rate": 0.75, "robust_accuracy": 0.7,
                       "defended_rate": 0.75},
        "created_at": datetime.now(UTC).isoformat(), "command": "test",
    }  # fmt: skip
    record.update(changes)
    path = vdir / precision_file("openvino", precision)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record))
    PrecisionRecord.model_validate(record)  # the test's record is itself valid
    return record


def test_reference_is_onnxruntime_fp32(store: Path) -> None:
    m = load_version(store, NAME, "1")
    info = m.runner.info
    assert (info.backend, info.precision, info.fallback) == ("onnxruntime", "fp32", None)
    logits, cosines = m.runner(prototypes(3))
    assert logits.shape == cosines.shape == (1, 10) and int(logits.argmax()) == 3


def test_bf16_without_a_record_serves_the_reference_and_says_why(store: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, "dsphere.runtimes"):
        m = load_version(store, NAME, "1", backend="openvino", precision="bf16")
    info = m.runner.info
    assert (info.backend, info.precision) == ("onnxruntime", "fp32")
    assert (info.requested_backend, info.requested_precision) == ("openvino", "bf16")
    assert info.fallback is not None and "openvino-bf16.json is missing" in info.fallback
    assert any("serving the fp32 ONNX Runtime reference" in r.message for r in caplog.records)


def test_a_record_of_other_model_bytes_is_refused(store: Path) -> None:
    write_record(store / NAME / "1", sha256="0" * 64)
    info = load_version(store, NAME, "1", backend="openvino", precision="bf16").runner.info
    assert info.backend == "onnxruntime" and "other model bytes" in (info.fallback or "")


@pytest.mark.parametrize("field, figures, why", [
    # the contract is on the (label, verdict) pair: labels that flip count although every verdict agrees
    ("clean", {"outcome": MIN_CLEAN_AGREEMENT - 0.0005}, "test (label, verdict) agreement"),
    ("adversarial", {"outcome": 0.98}, "adversarial (label, verdict) agreement"),
    ("borderline", {"outcome": MIN_BORDERLINE_FLOOR - 0.01}, "borderline (label, verdict) agreement"),
    ("robustness", {"defended_rate": 0.735}, "worst-case defended rate moves"),
    ("robustness", {"robust_accuracy": 0.689}, "worst-case robust accuracy moves"),
])  # fmt: skip
def test_a_record_below_the_contract_is_refused(store: Path, field: str, figures: dict[str, float],
                                                 why: str) -> None:
    vdir = store / NAME / "1"
    base = write_record(vdir)
    write_record(vdir, **{field: {**base[field], **figures}})
    info = load_version(store, NAME, "1", backend="openvino", precision="bf16").runner.info
    assert info.backend == "onnxruntime" and "misses the parity contract" in (info.fallback or "")
    assert why in (info.fallback or "")


@pytest.mark.parametrize("floor, why", [
    (None, "states no floor for its borderline set"),
    (MIN_BORDERLINE_FLOOR - 0.05, f"its borderline floor {MIN_BORDERLINE_FLOOR - 0.05} < {MIN_BORDERLINE_FLOOR}"),
    (1.0, "borderline (label, verdict) agreement 0.9900 < its floor 1.0"),
])  # fmt: skip
def test_the_borderline_set_keeps_the_floor_its_record_states(store: Path, floor: float | None, why: str) -> None:
    vdir = store / NAME / "1"
    base = write_record(vdir)
    write_record(vdir, borderline_floor=floor, borderline={**base["borderline"], "outcome": 0.99})
    info = load_version(store, NAME, "1", backend="openvino", precision="bf16").runner.info
    assert info.backend == "onnxruntime" and why in (info.fallback or ""), info


@pytest.mark.skipif(not _openvino_installed(), reason="needs openvino (make install installs it)")
@pytest.mark.parametrize("changes, rho, why", [
    ({"cpu_features": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]}, None,
     "this CPU's features"),
    ({"runtime_version": "2024.0.0-unmeasured"}, None, "is not the record's 2024.0.0-unmeasured"),
    ({}, 1.25, "rho 1.25 is not the record's"),
])  # fmt: skip
def test_a_record_made_under_other_conditions_is_refused(store: Path, changes: dict[str, Any], rho: float | None,
                                                          why: str) -> None:
    """Another CPU feature set (AMX), another OpenVINO release or a DSPHERE_RHO override was never measured."""
    write_record(store / NAME / "1", **changes)
    info = load_version(store, NAME, "1", backend="openvino", precision="bf16", rho=rho).runner.info
    assert info.backend == "onnxruntime" and "measured under other conditions" in (info.fallback or "")
    assert why in (info.fallback or ""), info.fallback


@pytest.mark.skipif(not _openvino_installed(), reason="needs openvino (make install installs it)")
@pytest.mark.anyio
async def test_a_rho_override_serves_the_reference_and_says_why(store: Path, make_client) -> None:
    write_record(store / NAME / "1")
    async with make_client(precision="bf16", rho=1.25) as c:
        runtime = (await c.get("/healthz")).json()["runtime"]
    assert runtime["backend"] == "onnxruntime" and "rho 1.25 is not the record's" in runtime["fallback"], runtime


def test_without_the_openvino_package_the_reference_runs(store: Path, monkeypatch) -> None:
    write_record(store / NAME / "1")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    info = load_version(store, NAME, "1", backend="openvino", precision="bf16").runner.info
    assert info.backend == "onnxruntime" and "openvino package is not installed" in (info.fallback or "")


@pytest.mark.skipif(not _openvino_installed(), reason="needs openvino (make install installs it)")
def test_a_cpu_without_native_bf16_runs_the_reference(store: Path, monkeypatch) -> None:
    write_record(store / NAME / "1", cpu_features=["avx2", "avx512f"])
    monkeypatch.setattr(runtimes, "cpu_features", lambda: ("avx2", "avx512f"))
    info = load_version(store, NAME, "1", backend="openvino", precision="bf16").runner.info
    assert info.backend == "onnxruntime" and "no native bf16" in (info.fallback or "")


@pytest.mark.skipif(not _openvino_installed(), reason="needs openvino (make install installs it)")
def test_bf16_with_a_record_runs_on_openvino_where_the_cpu_has_it(store: Path) -> None:
    """On a CPU with AVX512-BF16 or AMX: OpenVINO bf16, agreeing with the reference on the
    fixture's prototypes; elsewhere: the reference, with the CPU named as the reason."""
    write_record(store / NAME / "1")
    ref = load_version(store, NAME, "1").runner
    m = load_version(store, NAME, "1", backend="openvino", precision="bf16")
    info = m.runner.info
    if not HAS_BF16:
        assert info.backend == "onnxruntime" and "no native bf16" in (info.fallback or "")
        return
    assert (info.backend, info.precision, info.fallback) == ("openvino", "bf16", None)
    x = prototypes(*range(10), *range(10), *range(10))  # 30 rows
    (logits, cosines), (r_logits, r_cosines) = m.runner(x), ref(x)
    assert logits.dtype == np.float32 and logits.shape == (30, 10)
    assert (logits.argmax(1) == r_logits.argmax(1)).all()
    assert np.abs(cosines - r_cosines).max() < 0.02  # bf16: 8 bits of mantissa
    assert not np.array_equal(cosines, r_cosines)  # it is not the reference running


def test_onnxruntime_cannot_be_asked_for_bf16() -> None:
    with pytest.raises(SettingsError, match=r"DSPHERE_PRECISION=bf16 runs on OpenVINO"):
        load_settings(backend="onnxruntime", precision="bf16")
    assert load_settings(precision="bf16").runtime_backend == "openvino"
    assert load_settings().runtime_backend == "onnxruntime"
    with pytest.raises(SettingsError, match=r"DSPHERE_PRECISION='int8'"):
        load_settings(precision="int8")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_healthz_and_metrics_report_the_path_and_the_fallback(store: Path, make_client) -> None:
    async with make_client(precision="bf16") as c:
        health = (await c.get("/healthz")).json()
        metrics = (await c.get("/metrics")).text
    runtime = health["runtime"]
    assert (runtime["backend"], runtime["precision"]) == ("onnxruntime", "fp32")
    assert (runtime["requested_backend"], runtime["requested_precision"]) == ("openvino", "bf16")
    assert "is missing" in runtime["fallback"] and runtime["cpu_features"] == list(runtimes.cpu_features())
    line = re.search(r"^dsphere_inference_runtime_info\{(.*)\} 1\.0$", metrics, re.M)
    assert line, metrics[-1500:]
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line.group(1)))
    assert labels["backend"] == "onnxruntime" and labels["requested_precision"] == "bf16"
    assert "is missing" in labels["fallback"] and labels["cpu_features"] == ",".join(runtimes.cpu_features())


@pytest.mark.skipif(not _openvino_installed(), reason="needs openvino (make install installs it)")
def test_openvino_serves_on_its_own_session_alone(store: Path, monkeypatch) -> None:
    """OpenVINO fp32 (every CPU has it) with a record: no ONNX Runtime session is built, the providers and
    the runtime info come from the one session that serves, and its view of the graph is what is checked."""
    write_record(store / NAME / "1", precision="fp32")
    ref = load_version(store, NAME, "1")
    assert ref.providers == ("CPUExecutionProvider",) and ref.runner.info.providers == ref.providers

    def no_session(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an ONNX Runtime session was built while OpenVINO serves")

    monkeypatch.setattr(runtimes.ort, "InferenceSession", no_session)
    m = load_version(store, NAME, "1", backend="openvino", precision="fp32")
    info = m.runner.info
    assert (info.backend, info.precision, info.fallback) == ("openvino", "fp32", None)
    assert m.providers == ("openvino:CPU",) and m.provider == "openvino:CPU"
    assert m.input_name == ref.input_name == "input"
    assert [p.name for p in m.runner.signature.outputs] == [p.name for p in ref.runner.signature.outputs]
    assert m.runner.signature.inputs[0].dims[1:] == ref.runner.signature.inputs[0].dims[1:] == (1, 28, 28)
    x = prototypes(*range(10))
    (logits, _), (r_logits, _) = m.runner(x), ref.runner(x)
    assert (logits.argmax(1) == np.arange(10)).all() and np.abs(logits - r_logits).max() < 1e-3


def test_a_fallback_builds_the_reference_session_only_then(store: Path, monkeypatch) -> None:
    """Without a record the reference runs, on the session its fallback built, its providers reported."""
    built: list[object] = []
    real = runtimes.ort.InferenceSession

    def counting(*args: Any, **kwargs: Any) -> object:
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(runtimes.ort, "InferenceSession", counting)
    m = load_version(store, NAME, "1", backend="openvino", precision="bf16")
    assert len(built) == 1 and m.runner.info.backend == "onnxruntime" and m.runner.info.fallback
    assert m.providers == tuple(built[0].get_providers())  # type: ignore[attr-defined]
