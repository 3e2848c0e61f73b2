"""Rejection training: train the served verdict, not only the classifier (docs/METHOD.md,
"Training the verdict").

The served rule accepts ŷ = argmax logits iff the angle θ between the feature and W_ŷ is at
most τ_ŷ = ρ·(θ*ŷ + θσŷ). Training uses that very rule (`cones="served"`, the default): the
per-class thresholds τ_k come from the model's own statistics, measured the way export
measures them (θ*, θσ over training images, ρ calibrated to `target_reject_rate` on other
training images) and refreshed every `cone_refresh_every` iterations (`ServedCones`). The
rule becomes an extra logit: K class logits s·cos θ_k and a reject logit
s·(cos τ_ŷ − cos θ_ŷ + max_k cos θ_k), so "argmax is reject" is exactly "the served rule
rejects" (`rule_decision`, held equal to app.verdict by a test). `cones="fixed"` is the
3.0.0 generation's one cone of half-angle arccos(t) for every class. Three terms, each an
angular analogue of a published method:

- clean inputs inside the fixed cone of half-angle arccos(t) with a margin:
  CE([s(cos θ − m·1_y), s·t], y) (CosFace's additive margin, with the reject logit as an extra
  class). This term keeps the fixed cone even with served cones: it is what makes the classes
  compact. The served cones follow the model (ρ accepts 95 % of clean training images
  whatever their angles), so a clean term in them would pull nothing inward, and the outlier
  term alone drives every angle past 90° (measured: a from-scratch run fell to 22 % accuracy);
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

The served rule itself (`Rule`, `measure_rule`) and the attacker's side of it are
training/rule.py, shared with the guard and the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.attacks import eval_mode, logits_of, project
from training.models import ConvNet
from training.objectives import ObjectiveConfig, head_loss
from training.outliers import mixed_trained_outliers
from training.rule import Rule, measure_rule


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
    cones: str = "served"  # "served": per-class τ_k = ρ(θ*_k + θσ_k) of the model itself; "fixed": reject_cos
    cone_refresh_every: int = 25  # iterations between measurements of the served cones
    cone_n_stats: int = 2000  # training images for θ*, θσ; as many others for ρ
    target_reject_rate: float = 0.05  # the clean false-reject rate ρ is calibrated to, as in export

    def __post_init__(self) -> None:
        if not -1 < self.reject_cos < 1:
            raise ValueError("reject_cos must be in (-1, 1)")
        if self.cones not in ("served", "fixed"):
            raise ValueError('cones must be "served" or "fixed"')
        if self.cone_refresh_every < 1 or self.cone_n_stats < 10 or not 0 < self.target_reject_rate < 1:
            raise ValueError("cone_refresh_every >= 1, cone_n_stats >= 10 and target_reject_rate in (0, 1)")
        if self.scale <= 0 or self.margin < 0:
            raise ValueError("rejection scale must be > 0 and margin >= 0")
        if not all(0 <= v <= 1 for v in (self.outlier_fraction, self.shrunk_share, self.clean_fraction)):
            raise ValueError("outlier_fraction, shrunk_share and clean_fraction must be in [0, 1]")


def rule_logits(logits: Tensor, cosines: Tensor, cfg: RejectionConfig, cos_thr: Tensor,
                y: Tensor | None = None) -> Tensor:
    """(N, K+1): s·cos θ_k (minus s·m on the true class when y is given), then the reject
    logit s·(cos τ_ŷ − cos θ_ŷ + max_k cos θ_k) with ŷ = argmax logits (the served label) and
    τ the cones (K,): its argmax is the reject column exactly when the served rule rejects
    (cos θ_ŷ < cos τ_ŷ); when ŷ is also the cosines' argmax the reject logit is s·cos τ_ŷ."""
    served = logits.detach().argmax(1, keepdim=True)
    cos_hat = cosines.gather(1, served)
    reject = cos_thr.to(cosines.dtype)[served] - cos_hat + cosines.amax(1, keepdim=True)
    cos = cosines
    if y is not None and cfg.margin:
        cos = cos - cfg.margin * F.one_hot(y, cos.shape[1]).to(cos.dtype)
    return cfg.scale * torch.cat([cos, reject], dim=1)


def rule_decision(logits: Tensor, cosines: Tensor, cfg: RejectionConfig, cos_thr: Tensor) -> tuple[Tensor, Tensor]:
    """(labels, accepted) as training decides them: the label is argmax logits, the input is
    rejected when the reject column wins `rule_logits`."""
    z = rule_logits(logits, cosines, cfg, cos_thr)
    return logits.argmax(1), z.argmax(1) != z.shape[1] - 1


def correct_or_reject_loss(logits: Tensor, cosines: Tensor, y: Tensor, cfg: RejectionConfig,
                           cos_thr: Tensor) -> Tensor:
    """−log(p_y + p_reject) per row, (N,)."""
    z = rule_logits(logits, cosines, cfg, cos_thr)
    reject = torch.full_like(y, z.shape[1] - 1)
    good = torch.stack([z.gather(1, y.view(-1, 1)).squeeze(1), z.gather(1, reject.view(-1, 1)).squeeze(1)], 1)
    return torch.logsumexp(z, 1) - torch.logsumexp(good, 1)


def reject_loss(logits: Tensor, cosines: Tensor, cfg: RejectionConfig, cos_thr: Tensor) -> Tensor:
    """−log p_reject per row, (N,): the outlier term."""
    z = rule_logits(logits, cosines, cfg, cos_thr)
    return torch.logsumexp(z, 1) - z[:, -1]


class ServedCones:
    """The cones training rejects outside of, cos τ_k (K,): the served rule of the model as it
    trains (`measure_rule` on training images, every `cone_refresh_every` iterations), or the
    fixed cone of `reject_cos`. Its state goes into the checkpoint, so a resumed run uses the
    cones the interrupted one had."""

    def __init__(self, cfg: RejectionConfig, num_classes: int, x: Tensor | None = None,
                 y: Tensor | None = None) -> None:
        self.cfg = cfg
        self.cos_thr = torch.full((num_classes,), cfg.reject_cos)
        self.rule: Rule | None = None
        self.iteration: int | None = None
        n = min(cfg.cone_n_stats, len(x) // 2) if x is not None else 0  # a small training set: half and half
        self._stats = (x[:n], y[:n]) if x is not None and y is not None else None
        self._calib = x[n: 2 * n] if x is not None else None

    def due(self, iteration: int) -> bool:
        return self.cfg.cones == "served" and (self.iteration is None or iteration % self.cfg.cone_refresh_every == 0)

    def refresh(self, model: ConvNet, iteration: int) -> None:
        assert self._stats is not None and self._calib is not None, "served cones need training images"
        self.rule = measure_rule(model, *self._stats, self._calib, self.cfg.target_reject_rate)
        self.cos_thr = self.rule.cos_thresholds(self._calib.device)
        self.iteration = iteration

    def state(self) -> dict[str, Any] | None:
        if self.rule is None:
            return None
        return {"iteration": self.iteration, **self.rule.state()}

    def load(self, state: dict[str, Any] | None, device: torch.device | None = None) -> None:
        if not state:
            return
        self.iteration = int(state["iteration"])
        self.rule = Rule.of(state)
        self.cos_thr = self.rule.cos_thresholds(device)


def rejection_attack(model: nn.Module, x: Tensor, y: Tensor, outliers: Tensor, eps: float,
                     cfg: RejectionConfig, cos_thr: Tensor) -> tuple[Tensor, Tensor]:
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
            lg, cos = logits_of(model, both)
            assert cos is not None, "rejection training needs a model returning (logits, cosines)"
            loss = (correct_or_reject_loss(lg[:n], cos[:n], y, cfg, cos_thr).sum()
                    + reject_loss(lg[n:], cos[n:], cfg, cos_thr).sum())
            (g,) = torch.autograd.grad(loss, both)
            xa = project(xa + 2.5 * eps / steps * g[:n].sign(), x, eps)
            oa = project(oa + 2.5 * eps_o / steps * g[n:].sign(), outliers, eps_o)
    return xa.detach(), oa.detach()


def rejection_loss(model: ConvNet, net: nn.Module, x: Tensor, y: Tensor, eps: float, *, iteration: int,
                   cfg: RejectionConfig, objective: ObjectiveConfig, cones: ServedCones) -> tuple[Tensor, Tensor]:
    """(loss, logits of the clean rows) for one batch: every image attacked, the first
    clean_fraction of them also trained clean, plus outlier_fraction·len(x) synthetic
    outliers made from the batch; rejected outside `cones` (the fixed cone in the natural
    phase, eps = 0: a model that does not classify yet has no cones to serve)."""
    cos_thr = (cones.cos_thr if eps > 0 else torch.full_like(cones.cos_thr, cfg.reject_cos)).to(x.device)
    n_clean = max(1, int(round(cfg.clean_fraction * len(x))))
    xc, yc = x[:n_clean], y[:n_clean]
    n_out = int(round(cfg.outlier_fraction * len(x)))
    outliers = mixed_trained_outliers(x.repeat(-(-n_out // len(x)), 1, 1, 1)[:n_out], None)  # ceil: enough rows
    if eps > 0:
        x_adv, o_adv = rejection_attack(model, x, y, outliers, eps, cfg, cos_thr)
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
    rows_c, rows_a, rows_o = slice(0, n_clean), slice(n_clean, n_clean + n), slice(n_clean + n, None)
    compact = torch.full_like(cos_thr, cfg.reject_cos)  # the clean term's anchor: one fixed cone (see the top)
    clean = F.cross_entropy(rule_logits(logits[rows_c], cos[rows_c], cfg, compact, yc), yc)
    correct = F.cross_entropy(rule_logits(logits[rows_a], cos[rows_a], cfg, cos_thr), y, reduction="none")
    adv = ((1 - a + cfg.adv_ce_weight) * correct
           + a * correct_or_reject_loss(logits[rows_a], cos[rows_a], y, cfg, cos_thr)).mean()
    out = (reject_loss(logits[rows_o], cos[rows_o], cfg, cos_thr).mean() if len(cos[rows_o])
           else torch.zeros((), device=x.device))
    head = head_loss(model, logits, yc, iteration, objective, rows=slice(0, n_clean))
    loss = adv + cfg.clean_weight * clean + cfg.outlier_weight * out + cfg.head_weight * head
    return loss, logits[n_clean: n_clean + n]
