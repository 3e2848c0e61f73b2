"""SphereConv2d / SphereLinear against explicit per-patch references (unfold), heads,
orthogonality regularizer, numerical safety."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from training import SphereConv2d, SphereLinear, sphere_corr
from training.layers import CORRS, orthogonality_penalty
from training.models import ModelConfig, build_model


def reference_corr(cos: torch.Tensor, norm: torch.Tensor, corr: str, k: float = 0.3, a: float = 1.0) -> torch.Tensor:
    """docs/METHOD.md §1 written out literally, per patch."""
    theta = torch.acos(cos.clamp(-1, 1))
    if corr == "cosine":
        return cos
    if corr == "linear":
        return 1 - 2 * theta / math.pi
    if corr == "sigmoid":
        c = (1 + math.exp(-math.pi / (2 * k))) / (1 - math.exp(-math.pi / (2 * k)))
        e = torch.exp((theta - math.pi / 2) / k)
        return c * (1 - e) / (1 + e)
    if corr == "quadratic":
        return 1 - a * (1 - cos) ** 2
    if corr == "truncated":
        return torch.clamp(norm, max=1.0) * cos
    raise AssertionError(corr)


@pytest.mark.parametrize("corr", CORRS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding,dilation", [(0, 1), (1, 1), (2, 1), (2, 2)])  # (2, 1): wider than avg_pool2d allows
def test_sphere_conv_matches_unfold_reference(corr: str, stride: int, padding: int, dilation: int) -> None:
    torch.manual_seed(0)
    layer = SphereConv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation, corr=corr).double()
    x = torch.rand(2, 3, 9, 10, dtype=torch.float64) * 0.8
    out = layer(x)
    patches = F.unfold(x, 3, dilation=dilation, padding=padding, stride=stride)  # (N, C*k*k, L)
    w = layer.weight.flatten(1)  # (out, C*k*k)
    dot = torch.einsum("ok,nkl->nol", w, patches)
    norm = patches.norm(dim=1, keepdim=True)  # (N, 1, L): all channels of the receptive field
    cos = dot / (w.norm(dim=1).view(1, -1, 1) * norm)
    ref = reference_corr(cos, norm, corr).view_as(out)
    assert out.shape == F.conv2d(x, layer.weight, stride=stride, padding=padding, dilation=dilation).shape
    assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("corr", CORRS)
def test_sphere_linear_matches_reference(corr: str) -> None:
    torch.manual_seed(1)
    layer = SphereLinear(7, 4, corr=corr).double()
    x = torch.randn(5, 7, dtype=torch.float64) * 0.4
    w = layer.weight
    norm = x.norm(dim=1, keepdim=True)
    cos = x @ w.t() / (norm * w.norm(dim=1))
    assert_close(layer(x), reference_corr(cos, norm, corr), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("corr", CORRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_for_zero_input_and_collinear_patch(corr: str, dtype: torch.dtype) -> None:
    conv = SphereConv2d(1, 2, 3, corr=corr).to(dtype)
    with torch.no_grad():
        conv.weight[0].fill_(1.0)  # kernel 0 collinear with a constant patch
        conv.weight[1].fill_(-1.0)  # kernel 1 anti-collinear (cos = -1)
    for x in (torch.zeros(1, 1, 5, 5, dtype=dtype), torch.full((1, 1, 5, 5), 0.5, dtype=dtype)):
        x = x.clone().requires_grad_(True)
        out = conv(x)
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert torch.isfinite(x.grad).all()
        assert torch.isfinite(conv.weight.grad).all()
        conv.weight.grad = None
    lin = SphereLinear(4, 2, corr=corr).to(dtype)
    x = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    lin(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_collinear_patch_gives_extreme_values() -> None:
    conv = SphereConv2d(1, 2, 3, corr="cosine").double()
    with torch.no_grad():
        conv.weight[0].fill_(2.0)
        conv.weight[1].fill_(-3.0)
    out = conv(torch.full((1, 1, 3, 3), 0.7, dtype=torch.float64))
    assert_close(out.flatten(), torch.tensor([1.0, -1.0], dtype=torch.float64), atol=1e-9, rtol=0)


def test_unknown_corr_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown corr"):
        SphereConv2d(1, 2, 3, corr="bogus")
    with pytest.raises(ValueError, match="unknown corr"):
        sphere_corr(torch.zeros(1), "bogus")


@pytest.mark.parametrize("head", ["wsoftmax", "wm", "anneal"])
def test_w_softmax_logits_depend_only_on_angles(head: str) -> None:
    """Logits are ||x|| g(θ) (or |α| g(θ)): scaling W_j leaves them unchanged, and for the
    WM head scaling x does too."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(head=head, widths=(4, 4, 4), fc_dim=8)).double().eval()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    logits, cos = model(x)
    with torch.no_grad():
        model.classifier.linear.weight.mul_(torch.linspace(0.5, 3.0, 10, dtype=torch.float64).view(-1, 1))
    logits2, cos2 = model(x)
    assert_close(logits, logits2)
    assert_close(cos, cos2)
    feat = model.feature(x)
    if head == "wm":
        alpha = model.classifier.alpha
        assert_close(model.classifier(feat * 7.0)[0], logits)
        assert_close(logits, alpha.abs() * model.classifier.linear(feat))
    else:
        assert_close(logits, feat.norm(dim=1, keepdim=True) * cos, atol=1e-9, rtol=1e-6)


def test_orthogonality_penalty_zero_for_orthonormal_kernels() -> None:
    conv = SphereConv2d(2, 4, 3)
    lin = SphereLinear(6, 3)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(18, 4))
        conv.weight.copy_(q.t().reshape(4, 2, 3, 3) * 3.0)  # orthogonal, any norm
        q2, _ = torch.linalg.qr(torch.randn(6, 3))
        lin.weight.copy_(q2.t())
    net = torch.nn.Sequential(conv, lin)
    assert float(orthogonality_penalty(net)) < 1e-10
    with torch.no_grad():
        lin.weight[1] = lin.weight[0]
    assert float(orthogonality_penalty(net)) > 0.5


def test_model_returns_logits_and_cosines_for_both_input_shapes() -> None:
    for shape in [(1, 28, 28), (3, 32, 32)]:
        cfg = ModelConfig.for_input(shape, widths=(4, 4, 4), fc_dim=8)
        for arch, head in [("dsphere", "wm"), ("baseline", "softmax")]:
            model = build_model(ModelConfig.from_dict({**cfg.to_dict(), "arch": arch, "head": head})).eval()
            logits, cos = model(torch.rand(2, *shape))
            assert logits.shape == cos.shape == (2, 10)
            assert (cos.abs() <= 1 + 1e-6).all()
    cifar = ModelConfig.for_input((3, 32, 32))
    assert cifar.widths == (64, 128, 256) and cifar.convs_per_stage == 3 and cifar.fc_dim == 512
    sphere = build_model(ModelConfig())
    assert all(not isinstance(m, torch.nn.Conv2d) or isinstance(m, SphereConv2d) for m in sphere.modules())


@pytest.mark.parametrize("corr", CORRS)
@pytest.mark.parametrize("padding", [0, 1])
def test_sphere_conv_onnx_runtime_matches_pytorch(corr: str, padding: int) -> None:
    """Each layer alone, not only whole models: a scale error inside the layer (the patch
    norm) cancels in scale-invariant nets (cosine) but not in the input-truncated corr."""
    import io

    import onnxruntime as ort

    torch.manual_seed(0)
    layer = SphereConv2d(3, 4, 3, padding=padding, corr=corr).eval()
    x = torch.rand(2, 3, 6, 6)
    f = io.BytesIO()
    torch.onnx.export(layer, (x,), f, opset_version=17, dynamo=False, input_names=["x"])
    out = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), layer(x), atol=1e-5, rtol=1e-5)
