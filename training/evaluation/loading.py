"""Loading what an evaluation attacks: the model-store version (verified by the service's
own `app.model_store.load_version`), and the PyTorch model whose gradients the white-box
attacks follow (the checkpoint that produced the version, or the model rebuilt from
model.onnx's own weights), refused unless it matches model.onnx.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from app.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from app.model_store import ModelStoreError, load_version
from training.checkpoint import load_checkpoint
from training.evaluation.config import EvaluationError
from training.judging import PARITY_ATOL, OnnxModel, parity
from training.models import ConvNet
from training.onnx_weights import OnnxWeightsError, model_from_onnx


def version_path(path: str | Path | None, store: str | Path = "model_store", name: str | None = None,
                 version: str | None = None) -> Path:
    """A version directory from a path, or from store/name/version."""
    if path is not None:
        d = Path(path)
    else:
        if not name or not version:
            raise EvaluationError("give the version directory, or --name and --version (with --store)")
        d = Path(store) / name / version
    if not d.is_dir():
        hint = ""
        parent = d.parent
        if parent.is_dir():
            have = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
            hint = f" (available: {', '.join(have) or 'none'})"
        raise FileNotFoundError(f"model-store version {d} does not exist{hint}")
    for f in (MODEL_FILE, MANIFEST_FILE):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d} is not a model-store version: {f} missing")
    return d


def load_manifest(version_dir: Path) -> Manifest:
    """The version's manifest, after the service's checks (schema, names, sha256, ONNX I/O)."""
    d = version_dir.resolve()
    try:
        return load_version(d.parent.parent, d.parent.name, d.name).manifest
    except ModelStoreError as e:
        raise EvaluationError(str(e)) from None


@dataclass(frozen=True)
class WhiteBox:
    """The PyTorch model the white-box attacks differentiate, and where it came from."""

    model: ConvNet | None
    source: str | None  # "checkpoint", "model.onnx" or None (no white-box attacks)
    parity: float | None
    unavailable: str  # why white-box attacks are skipped, when model is None


def white_box_model(version_dir: Path, manifest: Manifest, onnx_model: OnnxModel, checkpoint: str | Path | None,
                    from_onnx: bool, x: Tensor) -> WhiteBox:
    if checkpoint is not None:
        model, ckpt = load_checkpoint(checkpoint)
        return WhiteBox(model, "checkpoint", check_checkpoint(model, ckpt, manifest, onnx_model, x, checkpoint), "")
    why = "no --checkpoint given (white-box attacks need the PyTorch model's gradients)"
    if not from_onnx:
        return WhiteBox(None, None, None, why)
    try:
        model = model_from_onnx(version_dir / MODEL_FILE, manifest.training.model_config_)
    except OnnxWeightsError as e:
        return WhiteBox(None, None, None, f"no --checkpoint given and {e}")
    return WhiteBox(model, "model.onnx", check_checkpoint(model, None, manifest, onnx_model, x,
                                                          version_dir / MODEL_FILE), "")


def check_checkpoint(model: ConvNet, ckpt: Any, manifest: Manifest, onnx_model: OnnxModel, x: Tensor,
                     checkpoint: str | Path) -> float:
    """Refuse a checkpoint that did not produce this version."""
    if tuple(model.config.input_shape) != tuple(manifest.input.shape):
        raise EvaluationError(f"checkpoint {checkpoint} takes inputs {model.config.input_shape}, the version "
                              f"{tuple(manifest.input.shape)}: it does not belong to this version")
    if ckpt is not None and ckpt.angle_stats is not None:
        d = max(np.abs(np.subtract(ckpt.angle_stats.mean_deg, manifest.angle_mean_deg)).max(),
                np.abs(np.subtract(ckpt.angle_stats.std_deg, manifest.angle_std_deg)).max())
        if d > 1e-6:
            raise EvaluationError(f"checkpoint {checkpoint} has other angle statistics than version "
                                  f"{manifest.name}/{manifest.version}: it does not belong to this version")
    diff = parity(model, onnx_model, x)
    if not diff <= PARITY_ATOL:
        raise EvaluationError(f"checkpoint {checkpoint} does not belong to version {manifest.name}/"
                              f"{manifest.version}: its outputs differ from model.onnx by {diff:.2e} (> {PARITY_ATOL})")
    return diff


class OnnxLogits(nn.Module):
    """ONNX Runtime as a forward-only torch module (logits): lets ART's score-based Square
    attack query the deployed model itself. No gradients flow through it."""

    def __init__(self, onnx_model: OnnxModel, num_classes: int) -> None:
        super().__init__()
        self.onnx_model = onnx_model
        self.num_classes = num_classes
        self._dummy = nn.Parameter(torch.zeros(()), requires_grad=False)  # ART wants parameters

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = self.onnx_model(x.detach().cpu())
        return torch.from_numpy(logits.astype(np.float32))
