"""The serving form of the export (training/serving_graph.py): the same function as the trained
model for every corr and head, weights still under their PyTorch names, and a graph that keeps
ONNX Runtime's blocked layout (no full-size layout reorder per sphere layer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.overrides import TorchFunctionMode

from support.ort_graph import optimized_graph_counts
from training.export import export_onnx
from training.judging import PARITY_ATOL, OnnxModel, parity
from training.layers import CORRS, sphere_layers
from training.models import HEADS, ModelConfig, build_model
from training.onnx_weights import model_from_onnx


def _inputs() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([torch.rand(16, 1, 28, 28),  # noise
                      torch.zeros(2, 1, 28, 28),  # blank: every patch norm 0 (the eps path)
                      torch.full((2, 1, 28, 28), 0.02),  # faint: patch norms below 1 (truncated's min)
                      (torch.rand(4, 1, 28, 28) > 0.5).float()])


@pytest.mark.parametrize("corr", CORRS)
@pytest.mark.parametrize("head", HEADS)
def test_serving_form_computes_the_trained_function(tmp_path: Path, corr: str, head: str) -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig(arch="dsphere", corr=corr, head=head)).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    assert parity(model, OnnxModel(path), _inputs()) < PARITY_ATOL / 2  # the export refuses above PARITY_ATOL


@pytest.mark.parametrize("head", ["softmax", "wsoftmax"])
def test_baseline_exports_unchanged_in_function(tmp_path: Path, head: str) -> None:
    model = build_model(ModelConfig(arch="baseline", head=head)).eval()
    export_onnx(model, tmp_path / "model.onnx")
    assert parity(model, OnnxModel(tmp_path / "model.onnx"), _inputs()) < PARITY_ATOL / 2


def test_weights_keep_their_pytorch_names(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="dsphere", corr="truncated", head="wm")
    model = build_model(cfg).eval()
    export_onnx(model, tmp_path / "model.onnx")
    rebuilt = model_from_onnx(tmp_path / "model.onnx", cfg.to_dict())
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_serving_graph_keeps_the_blocked_layout(tmp_path: Path) -> None:
    """At most one reorder per sphere conv (its one-channel factor map) plus the trunk's exit; the
    trained form's broadcast multiply needs two full-size ones per layer (15 on this CPU)."""
    model = build_model(ModelConfig(arch="dsphere", corr="truncated", head="wm")).eval()
    export_onnx(model, tmp_path / "model.onnx")
    convs = len(sphere_layers(model.features))
    assert optimized_graph_counts(tmp_path / "model.onnx")[1] <= convs + 1
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    out = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert out[0].shape == out[1].shape == (3, 10)



class _Made(TorchFunctionMode):
    """Records the device of every tensor a factory function (torch.full, ones, ...) makes."""

    FACTORIES = (torch.full, torch.ones, torch.zeros, torch.empty, torch.tensor, torch.eye, torch.arange)

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[torch.device] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES:
            self.devices.append(out.device)
        return out


@pytest.mark.parametrize("corr", CORRS)
def test_serving_form_makes_its_tensors_on_the_inputs_device(corr: str) -> None:
    """Every tensor the serving form creates is made on the input's device (the `meta` device
    stands for a GPU here: a tensor made on the CPU would not meet the input there)."""
    from training.serving_graph import ServingGraph, sphere_conv

    model = build_model(ModelConfig(corr=corr, head="wm", widths=(4, 8, 8), fc_dim=16)).eval().to("meta")
    dilated = type(sphere_layers(model)[0])(1, 2, 3, padding=2, dilation=2, corr=corr).to("meta")  # box sum by conv
    with _Made() as made:
        logits, cosines = ServingGraph(model)(torch.empty(3, 1, 28, 28, device="meta"))
        out = sphere_conv(dilated, torch.empty(1, 1, 8, 8, device="meta"), relu=True)
    assert logits.shape == cosines.shape == (3, 10) and out.shape == (1, 2, 8, 8)
    assert made.devices and all(d.type == "meta" for d in made.devices), made.devices
