"""Every precision record shipped in model_store/ (`<version>/precision/<backend>-<precision>.json`,
written by `python -m training precision`) describes its version's very model.onnx, meets the
parity contract, and still holds: the path's agreement with the fp32 reference, re-measured here
on the 10,000 clean test images and on the record's borderline adversarial inputs, is not below the
recorded figures (on a CPU with other features than the record's, not below the contract's floors)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from app import runtimes
from app.manifest import MIN_ADVERSARIAL_AGREEMENT, MIN_CLEAN_AGREEMENT, MODEL_FILE, PrecisionRecord
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


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: "/".join(p.relative_to(BUNDLED_STORE).parts))
def test_record_matches_its_model_and_the_contract(path: Path) -> None:
    vdir = path.parent.parent
    record = PrecisionRecord.model_validate_json(path.read_bytes())
    manifest = read_manifest(vdir / "manifest.json")
    assert (record.name, record.version, record.rho) == (manifest.name, manifest.version, manifest.rho)
    assert record.sha256 == manifest.sha256 == hashlib.sha256((vdir / MODEL_FILE).read_bytes()).hexdigest()
    assert path.name == f"{record.backend}-{record.precision}.json"
    assert record.failures() == [], "a shipped record must meet the contract"
    assert record.clean.n == 10_000 and (vdir / record.borderline_file).is_file()
    assert record.robustness.n_examples == manifest.metrics.worst_case_n_examples


@pytest.mark.slow
@pytest.mark.parametrize("path", RECORDS, ids=lambda p: "/".join(p.relative_to(BUNDLED_STORE).parts))
def test_agreement_has_not_fallen_below_the_record(path: Path) -> None:
    vdir = path.parent.parent
    record = PrecisionRecord.model_validate_json(path.read_bytes())
    name, version = vdir.parent.name, vdir.name
    model = load_version(BUNDLED_STORE, name, version, backend=record.backend, precision=record.precision)
    info = model.runner.info
    if not set(runtimes.BF16_FLAGS) & set(runtimes.cpu_features()) and record.precision == "bf16":
        # this CPU cannot run the path: the service must say so and serve the reference
        assert info.backend == "onnxruntime" and "no native bf16" in (info.fallback or ""), info
        return
    assert (info.backend, info.precision, info.fallback) == (record.backend, record.precision, None), info
    # measured as `python -m training precision` measures (training/precision.py)
    judges = Judges(OnnxModel(vdir / MODEL_FILE), BatchedRunner(model.runner), model.manifest)
    same_cpu = list(runtimes.cpu_features()) == record.cpu_features
    clean = torch.from_numpy((load_fashion_mnist_test(10_000).astype(np.float32) / 255.0)[:, None])
    got = judges.agreement("test", [clean])
    floor = (record.clean.label, record.clean.verdict) if same_cpu else (0.0, MIN_CLEAN_AGREEMENT)
    assert got.label >= floor[0] and got.verdict >= floor[1], (got, record.clean)
    border = torch.from_numpy(np.load(vdir / record.borderline_file)["x"].astype(np.float32))
    got = judges.agreement("borderline", [border])
    floor = (record.borderline.label, record.borderline.verdict) if same_cpu else (0.0, MIN_ADVERSARIAL_AGREEMENT)
    assert got.label >= floor[0] and got.verdict >= floor[1], (got, record.borderline)
