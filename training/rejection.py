"""Rejection training: train the served verdict, not only the classifier (docs/METHOD.md,
"Training the verdict").

The served rule accepts ŷ = argmax logits iff the angle θ between the feature and W_ŷ is at
most ρ·(θ*ŷ + θσŷ). While training, the cone of every class is one fixed half-angle
arccos(t), and the rule becomes an extra logit: K class logits s·cos θ_k and a reject logit
s·t, so "argmax is reject" is "the feature lies outside every cone". Three terms, each
an angular analogue of a published method:

- clean inputs inside their cone with a margin: CE([s(cos θ − m·1_y), s·t], y) (CosFace's
  additive margin, with the reject logit as an extra class);
- adversarial inputs CORRECT OR REJECTED, −log(p_y + p_reject) (Carlini & Wagner's combined
  model, Pang et al.'s rectified rejection, Chen et al.'s stratified robustness with
  rejection), made by a projected PGD on that very objective (not cross-entropy), plus
  `adv_ce_weight` of cross-entropy toward correct; a share of the rows has its perturbation
  shrunk by a ∈ U(0, 1) and is trained toward CORRECT in proportion 1 − a (CCAT, Stutz et
  al. 2020: small perturbations must not be rejected);
- synthetic outliers (training/outliers.py: constant images, noise, permuted and shuffled
  images, smooth blobs) and their worst case inside an ε-ball (ACET, Hein et al. 2019)
  trained to the reject logit.

After training, θ*, θσ are measured and ρ is calibrated to a 5 % clean false-reject rate on
validation, as for every model: the served rule is the geodesic rule of app/verdict.py.

`rule_objective` is the attacker's side of the served rule, shared by the guard and the
evaluation: positive iff the input is accepted with a wrong label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.verdict import Verdicts, geodesic_verdict
from training.attacks import eval_mode, logits_of, project
from training.models import ConvNet
from training.objectives import ObjectiveConfig, head_loss
from training.outliers import mixed_trained_outliers


@dataclass(frozen=True)
class RejectionConfig:
    scale: float = 10.0  # s: class logits s·cos θ_k, reject logit s·t
    reject_cos: float = 0.5  # t = cos of the training cone's half-angle (60°)
    margin: float = 0.1  # m: a clean input's cos θ_y − m must beat t and every other class
    outlier_fraction: float = 0.25  # synthetic outliers per batch, as a share of the batch size
    outlier_weight: float = 1.0  # weight of the outlier term
    outlier_eps: float = 0.1  # ACET: radius of the worst case around each outlier
    shrunk_share: float = 0.25  # share of adversarial rows with a shrunk perturbation (CCAT)
    clean_fraction: float = 0.25  # share of the batch also trained clean (margin term)
    clean_weight: float = 0.5  # weight of the clean margin term
    head_weight: float = 0.25  # weight of the head's own loss on clean rows (keeps its logits calibrated)
    adv_ce_weight: float = 0.5  # weight of plain cross-entropy (toward correct) on every attacked row
    attack_steps: int = 2  # steps of the training attack

    def __post_init__(self) -> None:
        if not -1 < self.reject_cos < 1:
            raise ValueError("reject_cos must be in (-1, 1)")
        if self.scale <= 0 or self.margin < 0:
            raise ValueError("rejection scale must be > 0 and margin >= 0")
        if not all(0 <= v <= 1 for v in (self.outlier_fraction, self.shrunk_share, self.clean_fraction)):
            raise ValueError("outlier_fraction, shrunk_share and clean_fraction must be in [0, 1]")


def rule_logits(cosines: Tensor, cfg: RejectionConfig, y: Tensor | None = None) -> Tensor:
    """(N, K+1): s·cos θ_k (minus s·m on the true class when y is given), then s·t."""
    cos = cosines
    if y is not None and cfg.margin:
        cos = cos - cfg.margin * F.one_hot(y, cos.shape[1]).to(cos.dtype)
    t = torch.full((len(cos), 1), cfg.reject_cos, dtype=cos.dtype, device=cos.device)
    return cfg.scale * torch.cat([cos, t], dim=1)


def correct_or_reject_loss(cosines: Tensor, y: Tensor, cfg: RejectionConfig) -> Tensor:
    """−log(p_y + p_reject) per row, (N,)."""
    z = rule_logits(cosines, cfg)
    reject = torch.full_like(y, z.shape[1] - 1)
    good = torch.stack([z.gather(1, y.view(-1, 1)).squeeze(1), z.gather(1, reject.view(-1, 1)).squeeze(1)], 1)
    return torch.logsumexp(z, 1) - torch.logsumexp(good, 1)


def reject_loss(cosines: Tensor, cfg: RejectionConfig) -> Tensor:
    """−log p_reject per row, (N,): the outlier term."""
    z = rule_logits(cosines, cfg)
    return torch.logsumexp(z, 1) - z[:, -1]


def rejection_attack(model: nn.Module, x: Tensor, y: Tensor, outliers: Tensor, eps: float,
                     cfg: RejectionConfig) -> tuple[Tensor, Tensor]:
    """PGD inside the ε-ball (random start, `attack_steps` signed steps of 2.5 ε / steps,
    projected), one gradient pass per step for both attacked halves of a batch:
    - x ascends −log(p_y + p_reject): toward an accepted wrong label, the attacker's goal;
    - the outliers (radius outlier_eps) ascend −log p_reject: toward any accepted label (ACET).
    Projected, not N-FGSM's unprojected noise: a model trained to reject the attacked rows
    would otherwise learn to reject N-FGSM's visible noise instead of the attacks it meets.
    Returns (x_adv, outliers_adv)."""
    n, eps_o, steps = len(x), cfg.outlier_eps, max(1, cfg.attack_steps)
    with eval_mode(model):
        xa = project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
        oa = project(outliers + torch.empty_like(outliers).uniform_(-eps_o, eps_o), outliers, eps_o)
        for _ in range(steps):
            both = torch.cat([xa, oa]).detach().requires_grad_(True)
            _, cos = logits_of(model, both)
            assert cos is not None, "rejection training needs a model returning (logits, cosines)"
            loss = correct_or_reject_loss(cos[:n], y, cfg).sum() + reject_loss(cos[n:], cfg).sum()
            (g,) = torch.autograd.grad(loss, both)
            xa = project(xa + 2.5 * eps / steps * g[:n].sign(), x, eps)
            oa = project(oa + 2.5 * eps_o / steps * g[n:].sign(), outliers, eps_o)
    return xa.detach(), oa.detach()


def rejection_loss(model: ConvNet, net: nn.Module, x: Tensor, y: Tensor, eps: float, iteration: int,
                   cfg: RejectionConfig, objective: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """(loss, logits of the clean rows) for one batch: every image attacked, the first
    clean_fraction of them also trained clean, plus outlier_fraction·len(x) synthetic
    outliers made from the batch."""
    n_clean = max(1, int(round(cfg.clean_fraction * len(x))))
    xc, yc = x[:n_clean], y[:n_clean]
    n_out = int(round(cfg.outlier_fraction * len(x)))
    outliers = mixed_trained_outliers(x.repeat(-(-n_out // len(x)), 1, 1, 1)[:n_out], None)  # ceil: enough rows
    if eps > 0:
        x_adv, o_adv = rejection_attack(model, x, y, outliers, eps, cfg)
    else:  # the natural phase: no attack, adversarial rows trained as clean ones
        x_adv, o_adv = x, outliers
    # CCAT: a share of the rows keeps only a fraction a of its perturbation, and is trained
    # toward correct in proportion 1 - a.
    a = torch.ones(len(x), device=x.device)
    shrunk = torch.rand(len(x), device=x.device) < cfg.shrunk_share
    a[shrunk] = torch.rand(int(shrunk.sum()), device=x.device)
    x_adv = (x + a.view(-1, 1, 1, 1) * (x_adv - x)).clamp(0.0, 1.0)

    model.train()
    logits, cos = net(torch.cat([xc, x_adv, o_adv]))
    n = len(x)
    cos_c, cos_a, cos_o = cos[:n_clean], cos[n_clean: n_clean + n], cos[n_clean + n:]
    clean = F.cross_entropy(rule_logits(cos_c, cfg, yc), yc)
    correct = F.cross_entropy(rule_logits(cos_a, cfg), y, reduction="none")
    adv = ((1 - a + cfg.adv_ce_weight) * correct + a * correct_or_reject_loss(cos_a, y, cfg)).mean()
    out = reject_loss(cos_o, cfg).mean() if len(cos_o) else torch.zeros((), device=x.device)
    head = head_loss(model, logits, yc, iteration, objective, rows=slice(0, n_clean))
    loss = adv + cfg.clean_weight * clean + cfg.outlier_weight * out + cfg.head_weight * head
    return loss, logits[n_clean: n_clean + n]


@dataclass(frozen=True)
class Rule:
    """The served rule as the attacker and the guard see it: per-class thresholds
    τ_k = ρ (θ*_k + θσ_k) in degrees."""

    angle_mean_deg: tuple[float, ...]
    angle_std_deg: tuple[float, ...]
    rho: float

    def cos_thresholds(self, device: torch.device | None = None) -> Tensor:
        tau = [min(180.0, self.rho * (m + s)) for m, s in zip(self.angle_mean_deg, self.angle_std_deg, strict=True)]
        return torch.cos(torch.deg2rad(torch.tensor(tau, dtype=torch.float32))).to(device)

    def verdicts(self, logits: Tensor, cosines: Tensor) -> Verdicts:
        """app.verdict.geodesic_verdict (the service's rule) on PyTorch outputs."""
        return geodesic_verdict(logits.detach().double().cpu().numpy(), cosines.detach().double().cpu().numpy(),
                                self.angle_mean_deg, self.angle_std_deg, self.rho)

    def broken(self, logits: Tensor, cosines: Tensor, y: Tensor) -> np.ndarray:
        """Accepted with a wrong label."""
        v = self.verdicts(logits, cosines)
        return v.accepted & (v.labels != y.cpu().numpy())


def rule_margins(logits: Tensor, cosines: Tensor, cos_thresholds: Tensor, kappa: float = 10.0) -> Tensor:
    """(N, K): min(logit margin of k, κ·(cos θ_k − cos τ_k)) per class k, positive exactly when
    the served rule answers k and accepts it."""
    k = logits.shape[1]
    eye = torch.eye(k, dtype=torch.bool, device=logits.device)
    others = logits.unsqueeze(1).masked_fill(eye.unsqueeze(0), float("-inf")).amax(2)  # (N, K): max_{j≠k}
    slack = kappa * (cosines - cos_thresholds.to(cosines.dtype).view(1, -1))
    return torch.minimum(logits - others, slack)


def rule_objective(logits: Tensor, cosines: Tensor, y: Tensor, cos_thresholds: Tensor,
                   kappa: float = 10.0, target: Tensor | None = None) -> Tensor:
    """The attacker's objective against the served rule, (N,): the rule margin of the given
    `target` class per row, or the largest over the wrong classes. Positive iff the rule accepts
    a wrong label; the attacker maximizes it."""
    obj = rule_margins(logits, cosines, cos_thresholds, kappa)
    if target is not None:
        return obj.gather(1, target.view(-1, 1)).squeeze(1)
    return obj.masked_fill(F.one_hot(y, obj.shape[1]).bool(), float("-inf")).amax(1)
