"""training/evaluation/loading.py: finding a version, and refusing a checkpoint that did not
produce it (the bundled store and the committed checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.manifest import MODEL_FILE
from training.checkpoint import load_checkpoint
from training.data import load_dataset
from training.evaluation.config import EvaluationError
from training.evaluation.loading import check_checkpoint, load_manifest, version_path, white_box_model
from training.judging import OnnxModel

ROOT = Path(__file__).resolve().parents[2]
V2 = ROOT / "model_store/fashion-mnist-dsphere/2.0.0"


def test_version_path_names_what_is_available(tmp_path: Path) -> None:
    assert version_path(None, ROOT / "model_store", "fashion-mnist-dsphere", "2.0.0") == V2
    with pytest.raises(FileNotFoundError, match=r"available: .*2\.0\.0"):
        version_path(None, ROOT / "model_store", "fashion-mnist-dsphere", "9.9.9")
    with pytest.raises(EvaluationError, match="--name and --version"):
        version_path(None, ROOT / "model_store")
    (tmp_path / "v").mkdir()
    with pytest.raises(FileNotFoundError, match="model.onnx missing"):
        version_path(tmp_path / "v")


def test_the_checkpoint_behind_a_version_is_accepted_and_another_refused() -> None:
    manifest = load_manifest(V2)
    onnx_model = OnnxModel(V2 / MODEL_FILE)
    x = load_dataset("fashion-mnist", "test").images[:16]
    own, own_ckpt = load_checkpoint(ROOT / "checkpoints/dsphere-wm-truncated-nfgsm")
    assert check_checkpoint(own, own_ckpt, manifest, onnx_model, x, "own") <= 1e-4
    other, other_ckpt = load_checkpoint(ROOT / "checkpoints/baseline-nfgsm")
    with pytest.raises(EvaluationError, match="does not belong to"):
        check_checkpoint(other, other_ckpt, manifest, onnx_model, x, "other")


def test_without_a_checkpoint_the_white_box_model_is_rebuilt_from_model_onnx() -> None:
    manifest = load_manifest(V2)
    onnx_model = OnnxModel(V2 / MODEL_FILE)
    x = load_dataset("fashion-mnist", "test").images[:8]
    wb = white_box_model(V2, manifest, onnx_model, None, True, x)
    assert wb.source == "model.onnx" and wb.model is not None and wb.parity is not None and wb.parity <= 1e-4
    off = white_box_model(V2, manifest, onnx_model, None, False, x)
    assert off.model is None and "no --checkpoint" in off.unavailable
