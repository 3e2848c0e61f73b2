"""Every precision record shipped in model_store/ (`<version>/precision/<backend>-<precision>.json`,
written by `python -m training precision`) describes its version's very model.onnx, and the service
serves its path only where the record meets the parity contract and was measured under the running
service's conditions (CPU features, runtime version, rho); elsewhere it serves the fp32 reference and
says why. Where it serves the path, the agreement re-measured here on the 10,000 clean test images
and on the record's borderline inputs is held to the record's own figures: not below them, nor below
the contract's clean floor and the borderline floor the record states."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from app import runtimes
from app.manifest import MIN_CLEAN_AGREEMENT, MODEL_FILE, PrecisionRecord
from app.model_store import load_version, read_manifest
from support.bundled import BUNDLED_STORE
from support.fashion_mnist import load_fashion_mnist_test
from training.judging import BatchedRunner, OnnxModel
from training.precision import Judges

RECORDS = sorted(BUNDLED_STORE.glob("*/*/precision/*.json"))


def test_the_served_versions_carry_a_bf16_record() -> None:
    """Both models make serve and compose serve have a bf16 path to offer."""
    names = {p.relative_to(BUNDLED_STORE).parts[0] for p in RECORDS if p.name == "openvino-bf16.json"}
    assert {"fashion-mnist-dsphere", "fashion-mnist-baseline"} <= names, RECORDS


def _ids(p: Path) -> str:
    return "/".join(p.relative_to(BUNDLED_STORE).parts)


def _conditions_here(record: PrecisionRecord) -> list[str]:
    """How this machine differs from where the record was measured (the service's own check)."""
    try:
        version = runtimes.openvino_version()
    except runtimes.RuntimeUnavailable as exc:
        return [str(exc)]
    return record.other_conditions(runtimes.cpu_features(), version, record.rho)


@pytest.mark.parametrize("path", RECORDS, ids=_ids)
def test_record_matches_its_model(path: Path) -> None:
    vdir = path.parent.parent
    record = PrecisionRecord.model_validate_json(path.read_bytes())
    manifest = read_manifest(vdir / "manifest.json")
    assert (record.name, record.version, record.rho) == (manifest.name, manifest.version, manifest.rho)
    assert record.sha256 == manifest.sha256 == hashlib.sha256((vdir / MODEL_FILE).read_bytes()).hexdigest()
    assert path.name == f"{record.backend}-{record.precision}.json"
    assert record.clean.n == 10_000 and (vdir / record.borderline_file).is_file()
    assert record.robustness.n_examples == manifest.metrics.worst_case_n_examples
    assert record.cpu_features and record.runtime_version, "a record names the conditions it was measured in"


@pytest.mark.parametrize("path", RECORDS, ids=_ids)
def test_a_record_below_the_contract_is_not_served_and_the_service_says_why(path: Path) -> None:
    """A shipped record that misses the contract (those measured before it was on the (label, verdict)
    pair) leaves its version on the fp32 reference, every missed floor named in the fallback."""
    vdir = path.parent.parent
    record = PrecisionRecord.model_validate_json(path.read_bytes())
    if not record.failures():
        pytest.skip("the record meets the contract (the re-check below holds it to its figures)")
    info = load_version(BUNDLED_STORE, vdir.parent.name, vdir.name, backend=record.backend,
                        precision=record.precision).runner.info
    assert (info.backend, info.precision) == ("onnxruntime", "fp32"), info
    assert "misses the parity contract" in (info.fallback or "")
    assert all(f in (info.fallback or "") for f in record.failures()), (info.fallback, record.failures())


@pytest.mark.slow
@pytest.mark.parametrize("path", RECORDS, ids=_ids)
def test_agreement_has_not_fallen_below_the_record(path: Path) -> None:
    vdir = path.parent.parent
    record = PrecisionRecord.model_validate_json(path.read_bytes())
    name, version = vdir.parent.name, vdir.name
    model = load_version(BUNDLED_STORE, name, version, backend=record.backend, precision=record.precision)
    info = model.runner.info
    if record.failures():
        assert info.backend == "onnxruntime" and "misses the parity contract" in (info.fallback or ""), info
        return
    differ = _conditions_here(record)
    if differ:  # measured elsewhere (other CPU features, another OpenVINO): the service must refuse and say so
        assert info.backend == "onnxruntime" and info.fallback, info
        assert any(d in info.fallback for d in differ), (info.fallback, differ)
        return
    assert (info.backend, info.precision, info.fallback) == (record.backend, record.precision, None), info
    # measured as `python -m training precision` measures (training/precision.py), held to this record's figures
    judges = Judges(OnnxModel(vdir / MODEL_FILE), BatchedRunner(model.runner), model.manifest)
    clean = torch.from_numpy((load_fashion_mnist_test(10_000).astype(np.float32) / 255.0)[:, None])
    got = judges.agreement("test", [clean])
    assert got.outcome >= max(record.clean.outcome, MIN_CLEAN_AGREEMENT), (got, record.clean)
    border = torch.from_numpy(np.load(vdir / record.borderline_file)["x"].astype(np.float32))
    got = judges.agreement("borderline", [border])
    assert record.borderline_floor is not None
    assert got.outcome >= max(record.borderline.outcome, record.borderline_floor), (got, record.borderline)
