"""The form a ConvNet is exported in: the same function as training's, written so that an
inference runtime runs it at the cost of its convolutions (docs/SERVING.md, "The sphere graph").

Training computes a SphereConv2d as (training/layers.py)

    cos = conv(x, ŵ) · rsqrt(‖patch‖² + ε²),   ‖patch‖² = boxsum(Σ_c x²)   (a one-channel map)

and the `truncated` corr multiplies by min(‖patch‖, 1). Exported as is, the one-channel map
sits between blocked ("NCHWc") convolutions: ONNX Runtime reorders every C_out-channel
output to plain layout, multiplies by the broadcast map and reorders back (15 reorders in
the 3.0.0 graph). Here the factor is computed on the one-channel map and broadcast back to
C_out channels by a 1x1 convolution with ones, so that the only full-size operation besides
the convolution is a same-shape multiplication, which stays blocked:

    s   = conv1x1(x·x, kh·kw · 1)                (Σ_c x², scaled; one channel)
    sq  = avgpool(s)                             (the box sum: mean of kh·kw times kh·kw)
    f   = 1 / max(√sq, 1)                        (truncated: min(n, 1)/n = 1/max(n, 1))
        = 1 / √(sq + ε²)                         (every other corr: the cosine's factor)
    out = relu(conv(x, ŵ)) · conv1x1(f, 1)       (cosine, truncated: f > 0, so relu commutes)

Differences from training's form: ε² is dropped under max(·, 1) (it changes nothing where
‖patch‖ ≥ 1 but rounding, and where ‖patch‖ < 1 both are 1), and sums are associated
differently; the export's parity check (1e-4 against PyTorch) bounds both. The kernels ŵ are
normalized in the graph from the raw weights, which stay initializers under their PyTorch
names (training/onnx_weights.py rebuilds the model from them); runtimes fold it at load.

The classifier computes W·x once for both outputs (training computes it twice).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.layers import NORM_EPS, SphereConv2d, SphereLinear, sphere_corr
from training.models import ConvNet

# corrs whose g(cos) is cos times a positive factor: relu commutes with the factor.
_SCALED_CORRS = ("cosine", "truncated")


def _normalized_kernels(layer: SphereConv2d) -> Tensor:
    w = layer.weight
    return w / torch.sqrt(w.pow(2).sum(dim=(1, 2, 3), keepdim=True) + NORM_EPS**2)


def _box_sum(layer: SphereConv2d, s: Tensor) -> Tensor:
    """Σ over each receptive field of a one-channel map `s` already scaled by kh·kw (the pool
    takes the mean), or a conv with ones where a pool cannot express the window."""
    kh, kw = layer.kernel_size
    pad = layer.padding
    if layer.dilation == (1, 1) and not isinstance(pad, str) and 2 * pad[0] <= kh and 2 * pad[1] <= kw:
        return F.avg_pool2d(s, layer.kernel_size, layer.stride, pad, count_include_pad=True)  # type: ignore[arg-type]
    ones = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=s.dtype, device=s.device)
    return F.conv2d(s, ones, None, layer.stride, pad, layer.dilation).clamp_min(0.0)  # type: ignore[arg-type]


def sphere_conv(layer: SphereConv2d, x: Tensor, relu: bool) -> Tensor:
    """layer(x), then relu when asked, in the exported form (module docstring)."""
    kh, kw = layer.kernel_size
    s = F.conv2d(x * x, torch.full((1, layer.in_channels, 1, 1), float(kh * kw), dtype=x.dtype, device=x.device))
    sq = _box_sum(layer, s)
    if layer.corr == "truncated":
        factor = 1.0 / torch.clamp(torch.sqrt(sq), min=1.0)
    else:
        factor = 1.0 / torch.sqrt(sq + NORM_EPS**2)
    factor = F.conv2d(factor, torch.ones(layer.out_channels, 1, 1, 1, dtype=x.dtype, device=x.device))  # to C_out
    y = F.conv2d(x, _normalized_kernels(layer), None, layer.stride, layer.padding, layer.dilation)
    if layer.corr in _SCALED_CORRS:
        return (torch.relu(y) if relu else y) * factor
    out = sphere_corr(y * factor, layer.corr, None, layer.sigmoid_k, layer.quadratic_a)
    return torch.relu(out) if relu else out


SphereConvForm = Callable[[SphereConv2d, Tensor, bool], Tensor]  # (layer, x, relu after it) -> output


def _trunk(features: nn.Sequential, x: Tensor, conv: SphereConvForm) -> Tensor:
    layers = list(features)
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, SphereConv2d):
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            x = conv(layer, x, relu)
            i += 2 if relu else 1
        else:
            x = layer(x)
            i += 1
    return x


class ServingGraph(nn.Module):
    """A ConvNet in its exported form. It holds the model's own modules under the model's
    attribute names, so the ONNX initializers keep their PyTorch names. `conv` is the form of
    each SphereConv2d (bench/graph_forms.py swaps in the forms it compares)."""

    def __init__(self, model: ConvNet, conv: SphereConvForm = sphere_conv) -> None:
        super().__init__()
        self.config = model.config
        self.conv = conv
        self.features = model.features
        self.fc = model.fc
        self.classifier = model.classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.fc(_trunk(self.features, x, self.conv).flatten(1))
        z = torch.relu(z) if self.config.feature_relu else z
        return self._classify(z)

    def _classify(self, x: Tensor) -> tuple[Tensor, Tensor]:
        head = self.classifier
        if head.head == "softmax":
            return head(x)
        w: Tensor = head.linear.weight  # type: ignore[assignment]  # (K, d)
        assert isinstance(head.linear, SphereLinear)
        # ‖x‖ and ‖W_j‖ as Classifier and SphereLinear compute them (both add 1e-12 = NORM_EPS²)
        x_norm = torch.sqrt(x.pow(2).sum(dim=1, keepdim=True) + NORM_EPS**2)  # (N, 1)
        cosines = F.linear(x, w) / (x_norm * torch.sqrt(w.pow(2).sum(dim=1) + NORM_EPS**2))  # W·x once
        g = sphere_corr(cosines, head.linear.corr, x_norm, head.linear.sigmoid_k, head.linear.quadratic_a)
        if head.head == "wm":
            assert head.alpha is not None
            return head.alpha.abs() * g, cosines
        return x_norm * g, cosines
