"""Learning objectives (docs/METHOD.md §3): cross-entropy on the head's logits, the weight
multiplier penalty η|α| (eq. 6), loss annealing between the sphere-normalized softmax
and W-Softmax (eq. 8), and the orthogonality regularizer on sphere layers.

Loss-annealing schedule (the paper leaves it to us), as in SphereFace:
    λ(t) = max(λ_min, λ_base / (1 + γ t)),  λ_base = 1000, γ = 0.1, λ_min = 1
so training starts as W-Softmax (λ/(1+λ) ≈ 1) and ends with equal weights on the
sphere-normalized and W-Softmax terms (λ_min = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.layers import orthogonality_penalty
from training.models import ConvNet


@dataclass(frozen=True)
class ObjectiveConfig:
    wm_eta: float = 1e-3
    ortho_weight: float = 1e-4
    anneal_lambda_base: float = 1000.0
    anneal_gamma: float = 0.1
    anneal_lambda_min: float = 1.0


def anneal_lambda(iteration: int, cfg: ObjectiveConfig) -> float:
    return max(cfg.anneal_lambda_min, cfg.anneal_lambda_base / (1.0 + cfg.anneal_gamma * iteration))


def head_loss(model: ConvNet, logits: Tensor, y: Tensor, iteration: int, cfg: ObjectiveConfig,
              rows: slice | None = None) -> Tensor:
    """The classification loss of the model's head for a forward pass just made; `rows`
    selects part of that forward's batch (logits and the recorded sphere logits)."""
    head = model.config.head
    if rows is not None:
        logits = logits[rows]
    ce = F.cross_entropy(logits, y)
    if head == "wm":
        alpha = model.classifier.alpha
        assert alpha is not None
        return ce + cfg.wm_eta * alpha.abs()
    if head == "anneal":
        sphere = model.classifier.sphere_logits
        assert sphere is not None, "anneal head: forward did not record sphere logits"
        if rows is not None:
            sphere = sphere[rows]
        lam = anneal_lambda(iteration, cfg)
        return (F.cross_entropy(sphere, y) + lam * ce) / (1.0 + lam)
    return ce


def regularizer(model: ConvNet, cfg: ObjectiveConfig) -> Tensor:
    if model.config.arch != "dsphere" or cfg.ortho_weight == 0:
        return torch.zeros(())
    return cfg.ortho_weight * orthogonality_penalty(model)
