"""The catastrophic-overfitting guard of every adversarial run.

Single-step adversarial training can overfit catastrophically (Wong et al. 2020): within a
few hundred iterations the model learns to defeat the one-step attack it trains on while
its accuracy under a multi-step attack falls to near zero, and the training loss looks
better than ever. The guard watches what matters instead: PGD-10 accuracy at the run's
full ε on a fixed subset of the validation split (never the test set), every `every`
iterations and at each epoch's end. The run keeps the checkpoint of the best such accuracy
(`best/`), and stops when the accuracy falls more than `max_drop` below that best.

Every check starts its PGD from the same seeded random state inside `fork_rng`, so the
guard neither depends on nor disturbs the training run's random stream (a resumed run
equals an uninterrupted one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from training.attacks import PGD, attack_dataset, predict


@dataclass(frozen=True)
class GuardConfig:
    every: int = 500  # iterations between checks (also one at each epoch's end)
    n_examples: int = 1000  # the first n examples of the validation split
    steps: int = 10  # PGD steps, step size 2.5 ε / steps, one random start
    max_drop: float = 0.20  # stop when PGD accuracy < best - max_drop
    seed: int = 20240607  # PGD's random start


@dataclass(frozen=True)
class GuardPoint:
    iteration: int
    epoch: int
    pgd_accuracy: float
    clean_accuracy: float


class CatastrophicOverfitting(Exception):
    """The guard stopped the run; best/ holds the checkpoint of highest PGD accuracy."""


class OverfittingGuard:
    """PGD-10 accuracy on a fixed validation subset, its history and its best point."""

    def __init__(self, cfg: GuardConfig, x_val: Tensor, y_val: Tensor, eps: float,
                 history: list[dict[str, Any]] | None = None) -> None:
        self.cfg = cfg
        self.x, self.y = x_val[: cfg.n_examples], y_val[: cfg.n_examples]
        self.eps = eps
        self.history = [GuardPoint(**h) for h in history or []]

    @property
    def best(self) -> GuardPoint | None:
        return max(self.history, key=lambda p: p.pgd_accuracy, default=None)

    def measure(self, model: nn.Module, iteration: int, epoch: int) -> GuardPoint:
        """Run the check, append it to the history and return it."""
        attack = PGD(self.eps, steps=self.cfg.steps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            x_adv = attack_dataset(model, attack, self.x, self.y)
        with torch.no_grad():
            adv_logits, _ = predict(model, x_adv)
            clean_logits, _ = predict(model, self.x)
        point = GuardPoint(iteration, epoch, _accuracy(adv_logits, self.y), _accuracy(clean_logits, self.y))
        self.history.append(point)
        return point

    def collapse_reason(self, point: GuardPoint) -> str | None:
        """Why the run must stop after this check, or None."""
        best = self.best
        if best is None or point.pgd_accuracy >= best.pgd_accuracy - self.cfg.max_drop:
            return None
        return (f"catastrophic overfitting: validation PGD-{self.cfg.steps} accuracy fell to "
                f"{point.pgd_accuracy:.3f} at iteration {point.iteration}, more than {self.cfg.max_drop:.2f} "
                f"below its best {best.pgd_accuracy:.3f} (iteration {best.iteration}); best/ holds that checkpoint")

    def to_list(self) -> list[dict[str, Any]]:
        return [asdict(p) for p in self.history]


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1).cpu() == y.cpu()).float().mean())
