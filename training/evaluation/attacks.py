"""The evaluation's attacks beyond training/attacks.py (FGSM, PGD):

- APGD-CE / APGD-DLR (Croce & Hein 2020) and Square (Andriushchenko et al. 2020, score
  based, no gradients) from adversarial-robustness-toolbox, on LogitsOnly(model);
- the adaptive attack on the whole geodesic pipeline (`AdaptiveAttack`);
- `check_ball`: every adversarial batch is asserted to lie in the eps-ball and [0, 1].

All attacks are callables (model, x, y) -> x_adv like training.attacks.PGD, so
training.attacks.attack_dataset batches them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from training.attacks import eval_mode, logits_of, project
from training.evaluation.served import Outputs, served_outputs
from training.rule import Rule, cosine_hinge

log = logging.getLogger("dsphere.evaluation")

BALL_TOL = 1e-5  # float32 rounding of x + delta


class AttackOutOfBall(AssertionError):
    """An attack returned an input outside the eps-ball or outside [0, 1]."""


def check_ball(x_adv: Tensor, x: Tensor, eps: float, name: str = "attack") -> float:
    """Assert x_adv is within eps (L-inf) of x and inside [0, 1]; returns max |x_adv - x|."""
    if x_adv.shape != x.shape:
        raise AttackOutOfBall(f"{name}: shape {tuple(x_adv.shape)} != {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise AttackOutOfBall(f"{name}: non-finite values")
    d = float((x_adv - x).abs().max()) if len(x) else 0.0
    if d > eps + BALL_TOL:
        raise AttackOutOfBall(f"{name}: perturbation {d:.6f} exceeds eps {eps}")
    lo, hi = (float(x_adv.min()), float(x_adv.max())) if len(x) else (0.0, 1.0)
    if lo < -BALL_TOL or hi > 1 + BALL_TOL:
        raise AttackOutOfBall(f"{name}: values outside [0, 1]: [{lo}, {hi}]")
    return d


def _num_classes(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "num_classes", getattr(model, "num_classes", 10)))


def _art_classifier(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """ART's PyTorchClassifier on the model's logits (LogitsOnly), inputs clipped to [0, 1]."""
    from art.estimators.classification import PyTorchClassifier

    from training.models import LogitsOnly

    model.eval()
    wrapped = LogitsOnly(model)
    p = next(model.parameters(), None)
    device_type = "gpu" if p is not None and p.device.type == "cuda" else "cpu"
    return PyTorchClassifier(model=wrapped.eval(), loss=nn.CrossEntropyLoss(), input_shape=input_shape,
                             nb_classes=num_classes, clip_values=(0.0, 1.0), device_type=device_type)


@dataclass(frozen=True)
class ArtAPGD:
    """ART AutoProjectedGradientDescent, L-inf, untargeted; loss "cross_entropy" or
    "difference_logits_ratio". Budget: `max_iter` iterations x `restarts` random inits."""

    eps: float
    loss_type: str = "cross_entropy"
    max_iter: int = 100
    restarts: int = 1
    batch_size: int = 250
    about: ClassVar[dict[str, str]] = {"library": "ART"}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        from art.attacks.evasion import AutoProjectedGradientDescent

        shape = tuple(x.shape[1:])
        k = _num_classes(model)
        with eval_mode(model):
            clf = _art_classifier(model, shape, k)
            attack = AutoProjectedGradientDescent(
                clf, norm=np.inf, eps=self.eps, eps_step=2 * self.eps, max_iter=self.max_iter, targeted=False,
                nb_random_init=self.restarts, batch_size=self.batch_size, loss_type=self.loss_type, verbose=False)
            x_adv = attack.generate(x.detach().cpu().numpy().astype(np.float32), y=y.cpu().numpy())
        out = torch.from_numpy(np.asarray(x_adv, dtype=np.float32)).to(x.device)
        check_ball(out, x, self.eps, f"APGD-{self.loss_type}")
        return project(out, x, self.eps)


@dataclass(frozen=True)
class ArtSquare:
    """ART SquareAttack, L-inf, score based (model outputs only, no gradients).
    Budget: `max_iter` queries per example x `restarts`."""

    eps: float
    max_iter: int = 1000
    restarts: int = 1
    p_init: float = 0.8
    batch_size: int = 250
    about: ClassVar[dict[str, str]] = {"library": "ART"}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        from art.attacks.evasion import SquareAttack

        k = _num_classes(model)
        with eval_mode(model):
            clf = _art_classifier(model, tuple(x.shape[1:]), k)
            attack = SquareAttack(clf, norm=np.inf, eps=self.eps, max_iter=self.max_iter, p_init=self.p_init,
                                  nb_restarts=self.restarts, batch_size=self.batch_size, verbose=False)
            x_adv = attack.generate(x.detach().cpu().numpy().astype(np.float32), y=y.cpu().numpy())
        out = torch.from_numpy(np.asarray(x_adv, dtype=np.float32)).to(x.device)
        check_ball(out, x, self.eps, "Square")
        return project(out, x, self.eps)


@dataclass(frozen=True)
class AdaptiveAttack:
    """White-box attack on the whole pipeline: classifier AND geodesic rejection.

    The attacker knows the angle statistics (theta*_j, theta_sigma_j) and rho. For each of
    the k likeliest wrong classes t (by the clean logits) it runs PGD (L-inf, sign steps,
    random start, `restarts`) minimizing

        loss_t = -cos(x, W_t) + c * relu(max_{j != t} logit_j - logit_t + margin)

    i.e. it pushes the feature into class t's cone while keeping t the predicted label.
    Every iterate is judged by the verdict rule (app.verdict.geodesic_verdict) on `judge`'s
    outputs (model.onnx in the evaluation) or the PyTorch ones; an example keeps the iterate
    that is accepted with a wrong label (largest angle slack first), over all targets and
    restarts. Success is re-judged by the caller on ONNX Runtime outputs of the final input.
    Examples never accepted-and-wrong keep a misclassified (rejected) iterate if there was one,
    else the clean input.
    """

    eps: float
    rule: Rule
    k: int = 3
    steps: int = 100
    restarts: int = 1
    step_size: float | None = None  # default 2.5 eps / steps
    c: float = 10.0
    margin: float = 0.5
    judge: Outputs | None = field(default=None, repr=False)  # the served outputs iterates are judged by
    about: ClassVar[dict[str, str]] = {"loss": "-cos(x, W_t) + c relu(max_{j!=t} z_j - z_t + margin), best over k "
                                               "targets"}

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def _score(self, x: Tensor, logits: Tensor, cosines: Tensor, y: Tensor) -> np.ndarray:
        """Accepted-and-wrong: 1e6 + angle slack; wrong but rejected: slack (< 0);
        correct: -inf, on `judge`'s outputs for x (or the model's own). Higher is better for the attacker."""
        v = self.rule.verdicts(*served_outputs(self.judge, x, logits, cosines))
        wrong = v.labels != y.cpu().numpy()
        slack = v.thresholds_deg - v.angles_deg
        return np.where(wrong & v.accepted, 1e6 + slack, np.where(wrong, slack, -np.inf))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        step, n = self.step, len(x)
        with eval_mode(model):
            with torch.no_grad():
                logits0, _ = logits_of(model, x)
            masked = logits0.clone()
            masked[torch.arange(n), y] = -float("inf")
            k = min(self.k, logits0.shape[1] - 1)
            targets = masked.topk(k, dim=1).indices  # (N, k): likeliest wrong classes
            best = x.clone()
            best_score = np.full(n, -np.inf)  # see _score; never misclassified: keep x
            for ti in range(k):
                t = targets[:, ti]
                for _ in range(max(1, self.restarts)):
                    x_adv = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
                    for it in range(self.steps + 1):
                        x_adv = x_adv.detach().requires_grad_(True)
                        logits, cosines = logits_of(model, x_adv)
                        assert cosines is not None, "the adaptive attack needs a (logits, cosines) model"
                        score = self._score(x_adv, logits, cosines, y)
                        better = score > best_score
                        if better.any():
                            idx = torch.from_numpy(np.nonzero(better)[0]).to(x.device)
                            best[idx] = x_adv.detach()[idx]
                            best_score[better] = score[better]
                        if it == self.steps:
                            break
                        loss = -cosine_hinge(logits, cosines, t, self.c, self.margin)
                        (g,) = torch.autograd.grad(loss.sum(), x_adv)
                        x_adv = project(x_adv.detach() - step * g.sign(), x, self.eps)
        return best.detach()


@dataclass(frozen=True)
class TransferAttack:
    """Black-box transfer: the inner attack runs on a substitute model; the target model is
    never queried. The callable ignores the model it is given."""

    substitute: nn.Module = field(repr=False)  # not a setting: the report names its checkpoint
    inner: Any = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.inner(self.substitute, x, y)
