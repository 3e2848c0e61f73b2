"""training/objectives.py on tiny models: each head's loss equals its formula, the annealing
schedule its closed form, the regularizer the weighted orthogonality penalty."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.layers import orthogonality_penalty
from training.models import ModelConfig, build_model
from training.objectives import ObjectiveConfig, anneal_lambda, head_loss, regularizer

TINY = dict(widths=(4, 4, 4), convs_per_stage=1, fc_dim=8)
CFG = ObjectiveConfig()


def forward(head: str, arch: str = "dsphere", n: int = 6) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, head=head, **TINY))  # type: ignore[arg-type]
    x = torch.rand(n, 1, 28, 28)
    y = torch.arange(n) % 10
    logits, _ = model(x)
    return model, logits, y


def test_anneal_lambda_closed_form() -> None:
    assert anneal_lambda(0, CFG) == CFG.anneal_lambda_base == 1000.0
    assert anneal_lambda(10, CFG) == pytest.approx(1000.0 / 2)  # 1 + 0.1 * 10 = 2
    lams = [anneal_lambda(t, CFG) for t in range(0, 20_000, 97)]
    assert all(a >= b for a, b in zip(lams, lams[1:], strict=False))  # never increases
    assert anneal_lambda(9990, CFG) == CFG.anneal_lambda_min == anneal_lambda(10**7, CFG)  # floor from t = 9990


@pytest.mark.parametrize("arch,head", [("baseline", "softmax"), ("dsphere", "softmax"), ("dsphere", "wsoftmax")])
def test_plain_heads_are_cross_entropy(arch: str, head: str) -> None:
    model, logits, y = forward(head, arch)
    torch.testing.assert_close(head_loss(model, logits, y, 0, CFG), F.cross_entropy(logits, y))


def test_weight_multiplier_head_adds_eta_abs_alpha() -> None:
    model, logits, y = forward("wm")
    with torch.no_grad():
        model.classifier.alpha.fill_(-3.0)  # |alpha|: the sign does not matter
    expected = F.cross_entropy(logits, y) + CFG.wm_eta * 3.0
    torch.testing.assert_close(head_loss(model, logits, y, 0, CFG), expected)


@pytest.mark.parametrize("iteration", [0, 100, 50_000])
def test_anneal_head_mixes_sphere_and_w_softmax_losses(iteration: int) -> None:
    model, logits, y = forward("anneal")
    sphere = model.classifier.sphere_logits
    lam = anneal_lambda(iteration, CFG)
    expected = (F.cross_entropy(sphere, y) + lam * F.cross_entropy(logits, y)) / (1 + lam)
    torch.testing.assert_close(head_loss(model, logits, y, iteration, CFG), expected)


@pytest.mark.parametrize("head", ["softmax", "wm", "anneal"])
def test_rows_select_part_of_the_forward(head: str) -> None:
    """Clean and adversarial halves of one forward: `rows` gives each half's own loss."""
    model, logits, y = forward(head, n=8)
    rows = slice(4, 8)
    full_sphere = model.classifier.sphere_logits
    part = head_loss(model, logits, y[rows], 7, CFG, rows=rows)
    if head == "anneal":  # what a forward of those rows alone would have recorded
        model.classifier.sphere_logits = full_sphere[rows]
    torch.testing.assert_close(part, head_loss(model, logits[rows], y[rows], 7, CFG))


def test_regularizer_is_the_weighted_orthogonality_penalty() -> None:
    model, _, _ = forward("wm")
    reg = regularizer(model, CFG)
    torch.testing.assert_close(reg, CFG.ortho_weight * orthogonality_penalty(model))
    assert reg.item() > 0  # random kernels are not orthonormal


@pytest.mark.parametrize("arch,weight", [("baseline", 1e-4), ("dsphere", 0.0)])
def test_regularizer_is_zero_without_sphere_layers_or_weight(arch: str, weight: float) -> None:
    model, _, _ = forward("softmax", arch)
    reg = regularizer(model, ObjectiveConfig(ortho_weight=weight))
    assert reg.shape == () and reg.item() == 0.0
