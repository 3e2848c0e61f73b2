"""A tiny but valid model-store version, built with onnx.helper + numpy (no torch).

Graph: x [N,1,28,28] -> (x - 0.5) -> flatten -> MatMul M [784, 10] -> f
       cosines = f / |f|   (class weights = the 10 unit axes)
       logits  = SCALE * cosines
M has orthonormal columns, so uniform noise gives an isotropic f whose best
cosine is ~0.5 (angle ~60 deg) -> rejected; `prototype(k)` (0.5 + 0.4*sign(M[:,k]))
gives cosine ~0.99 (angle ~7 deg) for class k -> accepted. Thresholds are
rho * (10 + 5) = 15 deg at rho=1.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from support.bundled import MODEL_NAME

NAME = MODEL_NAME  # the fixture stands in for the model the service serves by default
K = 10
SCALE = 10.0
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
ANGLE_MEAN = 10.0
ANGLE_STD = 5.0


def projection(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((784, K)))
    return q.astype(np.float32)


def prototype(k: int, seed: int = 0) -> np.ndarray:
    """uint8 28x28 image that the fixture model classifies as k with a small angle."""
    m = projection(seed)
    x = 0.5 + 0.4 * np.sign(m[:, k])
    return np.round(x * 255).astype(np.uint8).reshape(28, 28)


def build_model(
    seed: int = 0,
    output_names: tuple[str, str] = ("logits", "cosines"),
    input_name: str = "input",
    input_hw: tuple[int, int] = (28, 28),
) -> bytes:
    m = projection(seed)
    h, w = input_hw
    if (h, w) != (28, 28):
        m = np.resize(m, (h * w, K)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(m, "proj"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
        numpy_helper.from_array(np.array(SCALE, np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Sub", [input_name, "half"], ["centered"]),
        helper.make_node("Flatten", ["centered"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["feat"]),
        helper.make_node("Mul", ["feat", "feat"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axis1"], ["ss"], keepdims=1),
        helper.make_node("Add", ["ss", "eps"], ["ss_eps"]),
        helper.make_node("Sqrt", ["ss_eps"], ["norm"]),
        helper.make_node("Div", ["feat", "norm"], [output_names[1]]),
        helper.make_node("Mul", [output_names[1], "scale"], [output_names[0]]),
    ]
    graph = helper.make_graph(
        nodes,
        "fake-dsphere",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, h, w])],
        [
            helper.make_tensor_value_info(output_names[0], TensorProto.FLOAT, ["N", K]),
            helper.make_tensor_value_info(output_names[1], TensorProto.FLOAT, ["N", K]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dsphere-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest_dict(version: str, sha256: str, name: str = NAME, rho: float = 1.0) -> dict[str, Any]:
    op = {"rho": 1.0, "clean_reject_rate": 0.05, "accepted_accuracy": 0.95,
          "pgd_reject_rate": 0.8, "pgd_defended_rate": 0.9}
    return {
        "schema_version": 1,
        "name": name,
        "version": version,
        "created_at": "2025-01-01T00:00:00Z",
        "sha256": sha256,
        "class_names": CLASS_NAMES,
        "input": {"name": "input", "shape": [1, 28, 28], "dtype": "float32", "value_range": [0.0, 1.0]},
        "outputs": ["logits", "cosines"],
        "angle_mean_deg": [ANGLE_MEAN] * K,
        "angle_std_deg": [ANGLE_STD] * K,
        "rho": rho,
        "calibration": {"target_false_reject_rate": 0.05, "n_validation": 5000,
                        "validation_reject_rate": 0.05, "paper_rho1_validation_reject_rate": 0.1},
        "metrics": {
            "n_test": 10000, "clean_accuracy": 0.9, "clean_reject_rate": 0.05, "accepted_accuracy": 0.93,
            "pgd_robust_accuracy": 0.3, "pgd_reject_rate": 0.8, "pgd_defended_rate": 0.9,
            "pgd_attack": {"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 20, "step_size": 0.01,
                           "restarts": 1, "n_examples": 1000},
            "paper_rho1": op,
        },
        "training": {"model_config": {"arch": "fake"}, "training_config": {}, "command": "fake_store.py",
                     "dataset": "none"},
    }


def angle_histogram(per_class: int = 1000, bin_deg: float = 2.0) -> dict[str, Any]:
    """A manifest's `angle_histogram` for the fixture: per class, `per_class` angles spread as a
    normal law of ANGLE_MEAN and ANGLE_STD would put them into bins of `bin_deg` over [0, 180]."""
    edges = np.linspace(0.0, 180.0, int(round(180.0 / bin_deg)) + 1)
    cdf = np.array([0.5 * (1 + math.erf((e - ANGLE_MEAN) / (ANGLE_STD * math.sqrt(2)))) for e in edges])
    row = np.round(np.diff(cdf) * per_class).astype(int).tolist()
    return {"split": "train", "bin_edges_deg": edges.tolist(), "counts": [row] * K}


def write_version(
    store: Path,
    version: str = "1",
    name: str = NAME,
    model_bytes: bytes | None = None,
    manifest_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    rho: float = 1.0,
) -> Path:
    """Write store/name/version/{model.onnx, manifest.json}; returns the version directory."""
    data = model_bytes if model_bytes is not None else build_model(seed)
    d = store / name / version
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(data)
    man = manifest_dict(version, hashlib.sha256(data).hexdigest(), name=name, rho=rho)
    man.update(manifest_overrides or {})
    (d / "manifest.json").write_text(json.dumps(man, indent=1))
    return d
