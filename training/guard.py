"""The catastrophic-overfitting guard of every adversarial run.

Single-step adversarial training can overfit catastrophically (Wong et al. 2020): within a
few hundred iterations the model learns to defeat the one-step attack it trains on while
its accuracy under a multi-step attack falls to near zero, and the training loss looks
better than ever. The guard watches what matters instead: PGD-10 accuracy at the run's
full ε on a fixed subset of the validation split (never the test set), every `every`
iterations and at each epoch's end. The run keeps the checkpoint of the best such accuracy
(`best/`), and stops when the accuracy falls more than `max_drop` below that best.

In rejection training (training/rejection.py) the guard watches what is shipped: the
DEFENDED rate (1 − accepted-and-wrong) of the served geodesic rule under a rule-aware PGD-10
(it ascends `rule.rule_objective`, knowing the angle statistics and ρ), beside robust
accuracy under the same attack; `best/` is chosen on the defended rate. The rule is the one
export will ship: θ*, θσ on (a prefix of) the training split, ρ calibrated to
`target_reject_rate` on the validation images outside the guard's subset.

Each example keeps its best PGD iterate (the start and every step): misclassified first, then the
highest loss; in rejection training accepted-and-wrong by the served rule first, then the rule
objective. Every check starts its PGD from the same seeded random state inside `fork_rng`, so the
guard neither depends on nor disturbs the training run's random stream (a resumed run
equals an uninterrupted one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from training.attacks import PGD, attack_dataset, label_accuracy, misclassified_first, predict


@dataclass(frozen=True)
class GuardConfig:
    every: int = 500  # iterations between checks (also one at each epoch's end)
    n_examples: int = 1000  # the first n examples of the validation split
    steps: int = 10  # PGD steps, step size 2.5 ε / steps, one random start
    max_drop: float = 0.20  # stop when PGD accuracy < best - max_drop
    seed: int = 20240607  # PGD's random start
    n_stats: int = 10000  # rule-aware guard: training images the angle statistics come from
    target_reject_rate: float = 0.05  # rule-aware guard: clean false-reject rate of its rho
    kappa: float = 10.0  # rule-aware guard: weight of the angle slack in the attack's objective


@dataclass(frozen=True)
class GuardPoint:
    iteration: int
    epoch: int
    pgd_accuracy: float
    clean_accuracy: float
    defended_rate: float | None = None  # rule-aware guard only
    clean_reject_rate: float | None = None  # on the guard's subset, at the calibrated rho
    rho: float | None = None

    @property
    def score(self) -> float:
        """What best/ is chosen on: the defended rate when the guard knows the rule."""
        return self.pgd_accuracy if self.defended_rate is None else self.defended_rate


@dataclass(frozen=True)
class RuleData:
    """What a rule-aware guard needs besides its validation subset."""

    x_stats: Tensor  # training images: angle statistics
    y_stats: Tensor
    x_calib: Tensor  # validation images outside the guard's subset: rho
    y_calib: Tensor


class CatastrophicOverfitting(Exception):
    """The guard stopped the run; best/ holds the checkpoint of highest PGD accuracy."""


class OverfittingGuard:
    """PGD-10 accuracy on a fixed validation subset, its history and its best point."""

    def __init__(self, cfg: GuardConfig, x_val: Tensor, y_val: Tensor, eps: float,
                 rule: RuleData | None = None) -> None:
        self.cfg = cfg
        self.x, self.y = x_val[: cfg.n_examples], y_val[: cfg.n_examples]
        self.eps = eps
        self.rule = rule
        self.history: list[GuardPoint] = []

    @property
    def best(self) -> GuardPoint | None:
        return max(self.history, key=lambda p: p.score, default=None)

    def measure(self, model: nn.Module, iteration: int, epoch: int) -> GuardPoint:
        """Run the check, append it to the history and return it."""
        if self.rule is not None:
            point = self._measure_rule(model, iteration, epoch, self.rule)
        else:
            attack = PGD(self.eps, steps=self.cfg.steps, score_fn=misclassified_first)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                x_adv = attack_dataset(model, attack, self.x, self.y)
            with torch.no_grad():
                adv_logits, _ = predict(model, x_adv)
                clean_logits, _ = predict(model, self.x)
            point = GuardPoint(iteration, epoch, label_accuracy(adv_logits, self.y),
                               label_accuracy(clean_logits, self.y))
        self.history.append(point)
        return point

    def _measure_rule(self, model: nn.Module, iteration: int, epoch: int, data: RuleData) -> GuardPoint:
        from training.judging import Rates
        from training.rule import measure_rule, rule_objective

        served = measure_rule(model, data.x_stats, data.y_stats, data.x_calib, self.cfg.target_reject_rate)
        rho = served.rho
        cos_thr = served.cos_thresholds(self.x.device)
        kappa = self.cfg.kappa

        def loss(lg: Tensor, cs: Tensor | None, y: Tensor) -> Tensor:
            assert cs is not None
            return rule_objective(lg, cs, y, cos_thr, kappa)

        def broken_first(x: Tensor, lg: Tensor, cs: Tensor | None, y: Tensor) -> Tensor:
            """Accepted-and-wrong by the served rule (exactly) first, then the rule objective."""
            assert cs is not None
            broken = torch.from_numpy(served.broken(lg, cs, y)).to(lg.device)
            return loss(lg, cs, y) + 1e6 * broken.to(lg.dtype)

        attack = PGD(self.eps, steps=self.cfg.steps, loss_fn=loss, score_fn=broken_first)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            x_adv = attack_dataset(model, attack, self.x, self.y)

        y = self.y.cpu().numpy()
        adv, clean = (Rates.of_verdicts(served.verdicts(*predict(model, x)), y) for x in (x_adv, self.x))
        return GuardPoint(iteration, epoch, adv.accuracy, clean.accuracy, defended_rate=adv.defended_rate,
                          clean_reject_rate=clean.reject_rate, rho=float(rho))

    def collapse_reason(self, point: GuardPoint) -> str | None:
        """Why the run must stop after this check, or None."""
        best = self.best
        if best is None or point.score >= best.score - self.cfg.max_drop:
            return None
        what = "accuracy" if point.defended_rate is None else "defended rate (rule-aware)"
        return (f"catastrophic overfitting: validation PGD-{self.cfg.steps} {what} fell to "
                f"{point.score:.3f} at iteration {point.iteration}, more than {self.cfg.max_drop:.2f} "
                f"below its best {best.score:.3f} (iteration {best.iteration}); best/ holds that checkpoint")

    def to_list(self) -> list[dict[str, Any]]:
        return [asdict(p) for p in self.history]
