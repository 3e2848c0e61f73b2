"""SphereConv2d and SphereLinear: layers whose output is a bounded function of the
angle between kernel and input (docs/METHOD.md §1, "SphereCorr").

For a kernel w and the input patch x under it, cos θ = <w, x> / (||w|| ||x||), and the
layer outputs g(θ) for one of the corr functions below instead of <w, x>. No bias.

The patch norm ||x|| covers all input channels of the receptive field. It comes from
ONE extra convolution: sum_c x² (one channel) with an all-ones kernel (same stride,
padding and dilation), never from `unfold`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CORRS: tuple[str, ...] = ("cosine", "linear", "sigmoid", "quadratic", "truncated")

# Numerical safety.
# NORM_EPS: norms are sqrt(sum x² + NORM_EPS²). Adding it inside the sqrt (rather than
#   clamping the norm) keeps the norm differentiable at x = 0: d sqrt(s)/ds is infinite
#   at s = 0, d sqrt(s + eps²)/ds is 1/(2 eps). An all-zero patch then has cos θ = 0 and
#   finite gradients. 1e-6 is far below any real patch norm of [0, 1] images and of
#   post-ReLU activations, so it does not bias cos θ measurably.
# COS_MARGIN: θ = acos(cos θ) has an infinite derivative at cos θ = ±1 (a patch collinear
#   with its kernel). For the angle-based corrs we clamp cos θ to [-1 + m, 1 - m] with
#   m = 8 machine epsilons of the dtype: the derivative stays finite (≈ 1/sqrt(2m)), and
#   the clamp changes θ by at most sqrt(2m) rad (≈ 1e-3 rad in float32). The cosine,
#   quadratic and truncated corrs never take acos and are NOT clamped: by Cauchy-Schwarz
#   (and the eps terms, which only shrink it) |cos θ| <= 1 up to a few ulps of rounding,
#   harmless there, while a clamp costs a full-size pass forward and a mask pass backward
#   on every activation (measured: about a third of the SphereConv2d overhead on CPU).
NORM_EPS = 1e-6


def _cos_margin(dtype: torch.dtype) -> float:
    return 8 * torch.finfo(dtype).eps


def sphere_corr(
    cos: Tensor,
    corr: str,
    input_norm: Tensor | None = None,
    sigmoid_k: float = 0.3,
    quadratic_a: float = 1.0,
) -> Tensor:
    """g(θ) of docs/METHOD.md §1 from cos θ. `input_norm` (broadcastable to cos) is needed by
    "truncated" only."""
    if corr == "cosine":
        return cos
    if corr == "quadratic":
        return 1.0 - quadratic_a * (1.0 - cos) ** 2
    if corr == "truncated":
        if input_norm is None:
            raise ValueError("corr='truncated' needs the input norm")
        return torch.clamp(input_norm, max=1.0) * cos
    m = _cos_margin(cos.dtype)
    theta = torch.acos(cos.clamp(-1.0 + m, 1.0 - m))
    if corr == "linear":
        return 1.0 - 2.0 * theta / math.pi
    if corr == "sigmoid":
        k = sigmoid_k
        scale = (1.0 + math.exp(-math.pi / (2 * k))) / (1.0 - math.exp(-math.pi / (2 * k)))
        # (1 - e^{(θ-π/2)/k}) / (1 + e^{(θ-π/2)/k}) = -tanh((θ - π/2) / (2k))
        return -scale * torch.tanh((theta - math.pi / 2) / (2 * k))
    raise ValueError(f"unknown corr {corr!r}; expected one of {', '.join(CORRS)}")


def check_corr(corr: str) -> str:
    if corr not in CORRS:
        raise ValueError(f"unknown corr {corr!r}; expected one of {', '.join(CORRS)}")
    return corr


class SphereConv2d(nn.Conv2d):
    """nn.Conv2d re-parametrized to output g(angle(kernel, patch)); same `weight` layout,
    no bias. Output shape as nn.Conv2d: (N, out_channels, H', W')."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        corr: str = "cosine",
        *,
        sigmoid_k: float = 0.3,
        quadratic_a: float = 1.0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups=1, bias=False)
        self.corr = check_corr(corr)
        self.sigmoid_k = sigmoid_k
        self.quadratic_a = quadratic_a
        # The all-ones kernel of the patch-norm conv: (1, 1, kh, kw). A buffer, not a
        # parameter, and not saved in checkpoints (it is a constant).
        self.register_buffer("_ones", torch.ones(1, 1, *self.kernel_size), persistent=False)

    def patch_sq_norm(self, x: Tensor) -> Tensor:
        """||x||² + NORM_EPS² of every receptive field, all input channels: (N, 1, H', W')."""
        # sum over the receptive field of x² = the one-channel map sum_c x² convolved with
        # a (1, 1, kh, kw) box of ones: the same numbers, but the extra conv reads one
        # channel instead of C_in (its im2col and its backward shrink by C_in).
        s = (x * x).sum(dim=1, keepdim=True)
        kh, kw = self.kernel_size
        pad = self.padding  # an int pair: __init__ takes no string padding
        if self.dilation == (1, 1) and not isinstance(pad, str) and 2 * pad[0] <= kh and 2 * pad[1] <= kw:
            # the box sum as a sum-pool (the box mean with zero padding counted, times the box
            # size): the same convolution with ones, but its CPU kernel and its backward are a
            # few times cheaper than a one-channel mkldnn conv. Sums of squares: never negative.
            # Not `divisor_override=1`: ONNX's AveragePool has no such attribute and the
            # exporter drops it silently (model.onnx would then divide by kh·kw).
            sq = F.avg_pool2d(s, self.kernel_size, self.stride, self.padding,  # type: ignore[arg-type]
                              count_include_pad=True) * float(kh * kw)
        else:  # dilation, or padding wider than avg_pool2d allows
            ones: Tensor = self._ones  # type: ignore[assignment]  # a registered buffer
            sq = F.conv2d(s, ones.to(x.dtype), None, self.stride, self.padding, self.dilation)  # type: ignore[arg-type]
            # clamp: a fast conv algorithm may round a sum of squares to a tiny negative
            sq = sq.clamp_min(0.0)
        return sq + NORM_EPS**2

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight  # (C_out, C_in, kh, kw)
        # Normalize the (small) kernels rather than the (large) output: one full-size op fewer.
        w_hat = w / torch.sqrt(w.pow(2).sum(dim=(1, 2, 3), keepdim=True) + NORM_EPS**2)
        sq = self.patch_sq_norm(x)  # (N, 1, H', W')
        # Multiply by 1/||x|| (a one-channel map) rather than divide by ||x||: the backward
        # of a broadcast division costs three full-size passes (neg, div, mul) over the
        # (N, C_out, H', W') output, that of a multiplication one.
        cos = F.conv2d(x, w_hat, None, self.stride, self.padding, self.dilation) * torch.rsqrt(sq)
        x_norm = torch.sqrt(sq) if self.corr == "truncated" else None
        return sphere_corr(cos, self.corr, x_norm, self.sigmoid_k, self.quadratic_a)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", corr={self.corr}"


class SphereLinear(nn.Linear):
    """nn.Linear re-parametrized to output g(angle(W_j, x)) per output j; same `weight`
    layout (out_features, in_features), no bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        corr: str = "cosine",
        sigmoid_k: float = 0.3,
        quadratic_a: float = 1.0,
    ) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.corr = check_corr(corr)
        self.sigmoid_k = sigmoid_k
        self.quadratic_a = quadratic_a

    def cosine(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(cos θ (N, out), ||x|| (N, 1))."""
        w = self.weight
        w_norm = torch.sqrt(w.pow(2).sum(dim=1) + NORM_EPS**2)  # (out,)
        x_norm = torch.sqrt(x.pow(2).sum(dim=1, keepdim=True) + NORM_EPS**2)  # (N, 1)
        return F.linear(x, w) / (x_norm * w_norm), x_norm

    def forward(self, x: Tensor) -> Tensor:
        cos, x_norm = self.cosine(x)
        return sphere_corr(cos, self.corr, x_norm, self.sigmoid_k, self.quadratic_a)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", corr={self.corr}"


def sphere_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, SphereConv2d | SphereLinear)]


def orthogonality_penalty(module: nn.Module) -> Tensor:
    """Σ_layers ||Ŵᵀ Ŵ - I||_F² over sphere layers, the columns of Ŵ being the layer's
    flattened, normalized kernels (docs/METHOD.md §1). Zero for orthonormal kernels."""
    total: Tensor | None = None
    for layer in sphere_layers(module):
        w = layer.weight.flatten(1)  # type: ignore[operator]  # (out, fan_in)
        w = w / torch.sqrt(w.pow(2).sum(dim=1, keepdim=True) + NORM_EPS**2)
        gram = w @ w.t()  # (out, out)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        term = (gram - eye).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        p = next(module.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total
