"""Attacks aimed at the verdict: they know the served rule (the angle statistics θ*, θσ and
ρ) and win only when the input is ACCEPTED WITH A WRONG LABEL (Carlini & Wagner 2017,
Tramèr 2022: a rejection defense is only as good as the attack that knows it).

- `RuleAttack`: targeted PGD toward EVERY wrong class, two losses (the rule margin
  min(logit margin, κ·cosine slack to the target's threshold) of training/rule.py, and
  the cosine of the target with a hinge keeping it on top, rule.cosine_hinge), a decaying step size with
  backtracking (a step that lowers the objective is undone and its step halved), every
  iterate judged by the exact rule and the best kept;
- `OrthogonalPGD`: Bryniarski et al. 2021 (selective/orthogonal PGD): while the input is
  classified correctly, step on the classifier's loss projected orthogonally to the rule's
  gradient; once it is wrong, step on the rule's loss (the angle to the wrong label's
  threshold) projected orthogonally to the classifier's gradient;
- `RuleScores` + ART's Square: the same objective WITHOUT gradients, querying model.onnx;

All are callables (model, x, y) -> x_adv inside the ε-ball and [0, 1], like training.attacks.PGD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.attacks import eval_mode, logits_of, project
from training.evaluation.served import Outputs, served_outputs
from training.judging import BatchedRunner
from training.rule import Rule, cosine_hinge, rule_margins, rule_objective


@dataclass(frozen=True)
class RuleAttack:
    """Targeted PGD on every wrong class and both losses; per example the iterate that the exact
    rule accepts with a wrong label with the highest rule margin, else the one of highest rule
    margin, judged on `judge`'s outputs (model.onnx in the evaluation) or the model's own.
    Budget: (K−1) targets x len(losses) x restarts x steps gradient steps per example
    (targets skipped for examples already won)."""

    eps: float
    rule: Rule
    steps: int = 50
    restarts: int = 1
    kappa: float = 10.0
    losses: tuple[str, ...] = ("margin", "cosine")
    cosine_targets: int = 9  # the cosine loss on the likeliest wrong classes only (all of them by default)
    hinge_c: float = 10.0  # the cosine loss's hinge (rule.cosine_hinge)
    hinge_margin: float = 0.5
    judge: Outputs | None = field(default=None, repr=False)  # the served outputs iterates are judged by
    about: ClassVar[dict[str, str]] = {
        "targets": "every wrong class", "step_size": "2 eps / sqrt(steps), decaying, backtracking",
        "loss_margin": "min(logit margin of target, kappa (cos theta_t - cos tau_t))",
        "loss_cosine": "cos(x, W_t) - hinge_c relu(max_{j!=t} z_j - z_t + hinge_margin)"}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        n, dev = len(x), x.device
        cos_thr = self.rule.cos_thresholds(dev)
        with eval_mode(model):
            with torch.no_grad():
                logits0, _ = logits_of(model, x)
            k = logits0.shape[1]
            best = x.clone()
            best_obj = torch.full((n,), -float("inf"), device=dev)
            won = torch.zeros(n, dtype=torch.bool, device=dev)
            # likeliest wrong classes first, so that easy wins end an example early
            order = logits0.masked_fill(F.one_hot(y, k).bool(), -float("inf")).argsort(1, descending=True)[:, : k - 1]
            for ti in range(k - 1):
                for loss in self.losses:
                    if loss == "cosine" and ti >= self.cosine_targets:
                        continue
                    for _ in range(max(1, self.restarts)):
                        rows = (~won).nonzero().flatten()
                        if len(rows) == 0:
                            return best.detach()
                        xr, yr, tr = x[rows], y[rows], order[rows, ti]
                        xa, obj, ok = self._run(model, xr, yr, tr, loss, cos_thr)
                        better = ok | (~won[rows] & (obj > best_obj[rows]))
                        idx = rows[better]
                        best[idx] = xa[better]
                        best_obj[idx] = obj[better]
                        won[rows[ok]] = True
        return best.detach()

    def _objective(self, logits: Tensor, cosines: Tensor, y: Tensor, t: Tensor, loss: str, cos_thr: Tensor) -> Tensor:
        if loss == "margin":
            return rule_objective(logits, cosines, y, cos_thr, self.kappa, target=t)
        return cosine_hinge(logits, cosines, t, self.hinge_c, self.hinge_margin)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, t: Tensor, loss: str,
             cos_thr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One restart toward targets t: (best input, its rule margin toward t, won)."""
        n = len(x)
        step = torch.full((n,), 2.0 * self.eps / math.sqrt(self.steps), device=x.device)
        decay = 0.5 ** (1.0 / max(1, self.steps // 2))  # the step halves every steps/2 iterations
        x_cur = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
        x_best, f_best = x_cur.clone(), torch.full((n,), -float("inf"), device=x.device)
        g_best = torch.zeros_like(x)
        out_best = x.clone()
        obj_best = torch.full((n,), -float("inf"), device=x.device)
        score_best = torch.full((n,), -float("inf"), dtype=torch.float64, device=x.device)
        won = torch.zeros(n, dtype=torch.bool, device=x.device)
        for it in range(self.steps + 1):
            x_cur = x_cur.detach().requires_grad_(True)
            logits, cosines = logits_of(model, x_cur)
            assert cosines is not None, "rule attacks need a (logits, cosines) model"
            f = self._objective(logits, cosines, y, t, loss, cos_thr)
            with torch.no_grad():  # the best iterate by the served outputs: won first, then the margin
                lg, cs = served_outputs(self.judge, x_cur, logits, cosines)
                margin = rule_objective(lg, cs, y, cos_thr, self.kappa, target=t)
                ok = torch.from_numpy(self.rule.broken(lg, cs, y)).to(x.device)
                score = margin.double() + 1e6 * ok
                keep = score > score_best
                out_best[keep], obj_best[keep] = x_cur.detach()[keep], margin[keep].float()
                score_best[keep] = score[keep]
                won |= ok
            if it == self.steps:
                break
            (g,) = torch.autograd.grad(f.sum(), x_cur)
            with torch.no_grad():
                # backtracking: an iterate worse than the run's best is dropped; the next step
                # leaves the best point again, along its gradient, with half the step size
                worse = (f < f_best).view(-1, 1, 1, 1)
                better = ~worse.view(-1)
                x_best[better], f_best[better], g_best[better] = x_cur.detach()[better], f.detach()[better], g[better]
                step = torch.where(worse.view(-1), step / 2, step * decay)
                x_cur = project(x_best + step.view(-1, 1, 1, 1) * g_best.sign(), x, self.eps)
        return out_best, obj_best, won


@dataclass(frozen=True)
class OrthogonalPGD:
    """Selective orthogonal PGD (Bryniarski et al. 2021, "Evading Adversarial Example
    Detection Defenses with Orthogonal Projected Gradient Descent"), on the geodesic rule:
    - classified correctly: ascend cross-entropy, its gradient minus its component along the
      gradient of the rule loss (so the step does not push the input out of the cone);
    - classified wrongly: ascend the rule slack cos θ_ŷ − cos τ_ŷ of the current (wrong)
      label, minus its component along the classifier loss's gradient (so it stays wrong).
    Every iterate judged by the exact rule on `judge`'s outputs (model.onnx in the evaluation) or
    the model's own; per example the best misclassified iterate is kept: accepted-and-wrong first,
    then the highest slack."""

    eps: float
    rule: Rule
    steps: int = 100
    step_size: float | None = None  # default 2.5 eps / steps
    judge: Outputs | None = field(default=None, repr=False)  # the served outputs iterates are judged by
    about: ClassVar[dict[str, Any]] = {"selective": True}

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        step = self.step
        cos_thr = self.rule.cos_thresholds(x.device)
        n = len(x)
        with eval_mode(model):
            x_cur = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
            best = x.clone()  # never misclassified: the clean input
            best_score = torch.full((n,), -float("inf"), dtype=torch.float64, device=x.device)
            for it in range(self.steps + 1):
                x_cur = x_cur.detach().requires_grad_(True)
                logits, cosines = logits_of(model, x_cur)
                assert cosines is not None
                with torch.no_grad():  # the best misclassified iterate by the served outputs
                    lg, cs = served_outputs(self.judge, x_cur, logits, cosines)
                    label_s = lg.argmax(1)
                    broken = torch.from_numpy(self.rule.broken(lg, cs, y)).to(x.device)
                    slack_s = (cs.gather(1, label_s.view(-1, 1)).squeeze(1) - cos_thr.to(cs.dtype)[label_s]).double()
                    score = torch.where(label_s != y, slack_s + 1e6 * broken, -float("inf"))
                    keep = score > best_score
                    best[keep], best_score[keep] = x_cur.detach()[keep], score[keep]
                    wrong = logits.argmax(1) != y
                if it == self.steps:
                    break
                label = logits.argmax(1)
                ce = F.cross_entropy(logits, y, reduction="none")
                slack = cosines.gather(1, label.view(-1, 1)).squeeze(1) - cos_thr[label]
                (g_cls,) = torch.autograd.grad(ce.sum(), x_cur, retain_graph=True)
                (g_rule,) = torch.autograd.grad(slack.sum(), x_cur)
                with torch.no_grad():
                    a = torch.where(wrong.view(-1, 1, 1, 1), _orthogonal(g_rule, g_cls), _orthogonal(g_cls, g_rule))
                    x_cur = project(x_cur + step * a.sign(), x, self.eps)
        return best.detach()


def _orthogonal(g: Tensor, h: Tensor) -> Tensor:
    """g minus its projection on h, per example."""
    gf, hf = g.flatten(1), h.flatten(1)
    coef = (gf * hf).sum(1, keepdim=True) / (hf * hf).sum(1, keepdim=True).clamp_min(1e-20)
    return (gf - coef * hf).view_as(g)


class RuleScores(nn.Module):
    """model.onnx behind a forward-only module whose K 'logits' are the rule margins:
    s_k = min(logit margin of k, κ·(cos θ_k − cos τ_k)), except the true class, floored at a
    tiny positive value. So "argmax ≠ y" is exactly "accepted with a wrong label", and a
    score-based attack (Square) that lowers s_y − max_{k≠y} s_k attacks the rule itself,
    without gradients. The true labels are set per call with `labels`."""

    FLOOR = 1e-6

    def __init__(self, onnx_model: BatchedRunner, rule: Rule, num_classes: int, kappa: float = 10.0) -> None:
        super().__init__()
        self.onnx_model, self.rule, self.num_classes, self.kappa = onnx_model, rule, num_classes, kappa
        self._dummy = nn.Parameter(torch.zeros(()), requires_grad=False)  # ART wants parameters
        self.cos_thr = rule.cos_thresholds()

    def forward(self, x: Tensor) -> Tensor:
        logits, cosines = self.onnx_model(x.detach().cpu())
        return rule_margins(torch.from_numpy(logits).float(), torch.from_numpy(cosines).float(), self.cos_thr,
                            self.kappa)


@dataclass(frozen=True)
class RuleSquare:
    """ART's Square attack (score based, no gradients) on `RuleScores` of model.onnx: the
    true class's score floored, so Square stops only on an accepted-and-wrong input."""

    eps: float
    rule: Rule
    max_iter: int = 1000
    restarts: int = 1
    p_init: float = 0.8
    kappa: float = 10.0
    about: ClassVar[dict[str, str]] = {"library": "ART", "scores": "rule margins, true class floored"}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        from art.attacks.evasion import SquareAttack
        from art.estimators.classification import PyTorchClassifier

        assert isinstance(model, RuleScores), "RuleSquare queries a RuleScores module"
        floored = _FlooredTrueClass(model, y)
        clf = PyTorchClassifier(model=floored.eval(), loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                nb_classes=model.num_classes, clip_values=(0.0, 1.0), device_type="cpu")
        attack = SquareAttack(clf, norm=np.inf, eps=self.eps, max_iter=self.max_iter, p_init=self.p_init,
                              nb_restarts=self.restarts, batch_size=len(x), verbose=False)
        x_adv = attack.generate(x.detach().cpu().numpy().astype(np.float32), y=y.cpu().numpy())
        return project(torch.from_numpy(np.asarray(x_adv, dtype=np.float32)).to(x.device), x, self.eps)


class _FlooredTrueClass(nn.Module):
    """RuleScores with the true class's score floored at a tiny positive value. ART's Square
    queries subsets of the batch it was given, so rows are matched to their labels by
    content (the digest of the clean input is not known after perturbation): instead the
    floor is applied to every class whose rule margin could be the true one, i.e. the true
    label is looked up per row by nearest clean input."""

    def __init__(self, scores: RuleScores, y: Tensor) -> None:
        super().__init__()
        self.scores = scores
        self._dummy = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.y = y.cpu()
        self.x_clean: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        s = self.scores(x)
        y = self._labels(x)
        floor = torch.full_like(s[:, 0], RuleScores.FLOOR)
        s_true = torch.maximum(s.gather(1, y.view(-1, 1)).squeeze(1), floor)
        return s.scatter(1, y.view(-1, 1), s_true.view(-1, 1))

    def _labels(self, x: Tensor) -> Tensor:
        """Square keeps every row within ε of its clean input and the first call is the clean
        batch itself: the label of a row is that of the clean input nearest to it (L∞)."""
        xc = x.detach().cpu()
        if self.x_clean is None:
            self.x_clean = xc.clone()
        if len(xc) == len(self.x_clean) and torch.equal(xc, self.x_clean):
            return self.y
        d = torch.cdist(xc.flatten(1), self.x_clean.flatten(1), p=float("inf"))
        return self.y[d.argmin(1)]
