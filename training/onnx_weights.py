"""Rebuild the PyTorch model of a model-store version from its model.onnx.

`python -m training export` uses the legacy exporter, which keeps every parameter as an
initializer under its PyTorch name (`features.0.weight`, `classifier.alpha`, ...), and the
manifest carries the model config. So a version alone is enough for white-box evaluation,
even when the training checkpoint that produced it is gone. The caller must still check
the rebuilt model against ONNX Runtime (training.evaluation.core.check_checkpoint does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper

from training.models import ConvNet, ModelConfig, build_model


class OnnxWeightsError(ValueError):
    """model.onnx does not hold the weights under their PyTorch names; one line."""


def model_from_onnx(onnx_path: str | os.PathLike[str], model_config: dict[str, Any]) -> ConvNet:
    """A ConvNet built from `model_config` with the initializers of `onnx_path` as weights."""
    path = Path(onnx_path)
    try:
        cfg = ModelConfig.from_dict(model_config)
    except (KeyError, TypeError, ValueError) as e:
        raise OnnxWeightsError(f"the manifest's model_config does not describe a model: {e}") from None
    model = build_model(cfg)
    initializers = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    state = model.state_dict()
    missing = [k for k in state if k not in initializers]
    if missing:
        raise OnnxWeightsError(f"{path} has no initializer named {missing[0]!r} ({len(missing)} of {len(state)} "
                               "weights missing): it was not exported by `python -m training export`; "
                               "pass the training checkpoint instead")
    weights: dict[str, torch.Tensor] = {}
    for key, ref in state.items():
        arr = numpy_helper.to_array(initializers[key])
        if tuple(arr.shape) != tuple(ref.shape):
            raise OnnxWeightsError(f"{path}: initializer {key!r} has shape {tuple(arr.shape)}, the model config "
                                   f"expects {tuple(ref.shape)}")
        weights[key] = torch.from_numpy(arr.copy()).to(ref.dtype)
    model.load_state_dict(weights)
    return model.eval()
