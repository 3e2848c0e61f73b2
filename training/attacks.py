"""L∞ attacks on [0, 1] images: FGSM (Goodfellow et al. 2015, optionally with a random
start as in Wong et al. 2020), PGD (Madry et al. 2018, random start, restarts), and the two
attacks that only adversarial training uses: N-FGSM (de Jorge et al. 2022) and the KL
maximization inside TRADES (Zhang et al. 2019).

All take a model returning `(logits, cosines)` or plain logits, work on a batch
(N, C, H, W), keep every x_adv inside [0, 1] and, except N-FGSM (whose point is not to
project), inside the ε-ball around x (one shared `project`), and restore the model's
train/eval mode on return.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor | None, Tensor], Tensor]  # (logits, cosines or None, y) -> loss (N,)
# (x, logits, cosines or None, y) -> (N,) how good each row of x is for the attacker (higher is better)
ScoreFn = Callable[[Tensor, Tensor, Tensor | None, Tensor], Tensor]


def logits_of(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    out = model(x)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def ce_loss(logits: Tensor, cosines: Tensor | None, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def misclassified_first(x: Tensor, logits: Tensor, cosines: Tensor | None, y: Tensor) -> Tensor:
    """A ScoreFn: misclassified rows first, then the higher cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none") + 1e6 * (logits.argmax(1) != y).to(logits.dtype)


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Onto the L∞ ball of radius eps around x, intersected with [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Attack in eval mode (no dropout/BN updates) and restore the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
          score_fn: ScoreFn | None = None) -> tuple[Tensor, Tensor | None]:
    """(the loss's gradient at x, score_fn of x from the same forward pass, or None)."""
    x = x.detach().requires_grad_(True)
    logits, cos = logits_of(model, x)
    loss = loss_fn(logits, cos, y)  # (N,)
    (g,) = torch.autograd.grad(loss.sum(), x)
    if score_fn is None:
        return g, None
    with torch.no_grad():
        return g, score_fn(x.detach(), logits.detach(), None if cos is None else cos.detach(), y)


@dataclass(frozen=True)
class FGSM:
    """Fast gradient sign method, L∞. x_adv = Π(x0 + step · sign ∇ℓ), x0 = x or, with
    random_start, x + U(-ε, ε). Defaults: step = ε (1.25ε with random start, Wong et al.)."""

    eps: float
    random_start: bool = False
    step_size: float | None = None
    loss_fn: LossFn = ce_loss

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else (1.25 * self.eps if self.random_start else self.eps)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        step = self.step
        with eval_mode(model):
            x0 = x
            if self.random_start:
                x0 = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
            g, _ = _grad(model, x0, y, self.loss_fn)
            return project(x0 + step * g.sign(), x, self.eps).detach()


@dataclass(frozen=True)
class PGD:
    """Projected gradient descent, L∞ (Madry et al.). `steps` signed-gradient steps of
    `step_size` (default 2.5ε/steps) from a uniform random start in the ε-ball; with
    `restarts` > 1 each example keeps the run of highest loss (misclassified runs first).
    With `score_fn`, each example keeps instead its best iterate (the start and every step) over
    all runs by that score.
    Shapes: x (N, C, H, W) in [0, 1], y (N,) -> x_adv (N, C, H, W)."""

    eps: float
    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    loss_fn: LossFn = ce_loss
    score_fn: ScoreFn | None = field(default=None, repr=False)  # keep each example's best iterate by it

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        step = self.step
        with eval_mode(model):
            best = x.clone()
            best_score = torch.full((len(x),), -float("inf"), device=x.device)

            def keep(x_it: Tensor, score: Tensor) -> None:
                better = score > best_score
                best[better] = x_it[better]
                best_score.copy_(torch.where(better, score, best_score))

            for _ in range(max(1, self.restarts)):
                x_adv = x.clone()
                if self.random_start:
                    x_adv = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
                for _ in range(self.steps):
                    g, score = _grad(model, x_adv, y, self.loss_fn, self.score_fn)
                    if score is not None:
                        keep(x_adv, score)
                    x_adv = project(x_adv + step * g.sign(), x, self.eps).detach()
                with torch.no_grad():
                    logits, cos = logits_of(model, x_adv)
                    if self.score_fn is not None:
                        keep(x_adv, self.score_fn(x_adv, logits, cos, y))
                        continue
                    loss = self.loss_fn(logits, cos, y)
                    # a misclassifying run beats any correct one; then the higher loss wins
                    keep(x_adv, loss + 1e6 * (logits.argmax(1) != y).float())
            return best.detach()


@dataclass(frozen=True)
class NFGSM:
    """N-FGSM, L∞ (de Jorge et al. 2022, "Make Some Noise: Reliable and Efficient
    Single-Step Adversarial Training"): x0 = x + U(-kε, kε) with k = `noise_factor` (2),
    one signed-gradient step of `step_size` (default ε), and NO projection back to the
    ε-ball: only clipping to [0, 1], so ||x_adv - x||∞ ≤ (k + 1)ε. The large noise and the
    missing projection are what keep single-step training from catastrophic overfitting.
    Shapes: x (N, C, H, W) in [0, 1], y (N,) -> x_adv (N, C, H, W)."""

    eps: float
    noise_factor: float = 2.0
    step_size: float | None = None
    loss_fn: LossFn = ce_loss

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        step = self.step_size if self.step_size is not None else self.eps
        radius = self.noise_factor * self.eps
        with eval_mode(model):
            x0 = (x + torch.empty_like(x).uniform_(-radius, radius)).clamp(0.0, 1.0)
            g, _ = _grad(model, x0, y, self.loss_fn)
            return (x0 + step * g.sign()).clamp(0.0, 1.0).detach()


def kl_clean_adv(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """KL(p(x) ‖ p(x')) per example, (N,): TRADES' boundary term."""
    return F.kl_div(F.log_softmax(adv_logits, 1), F.log_softmax(clean_logits, 1), reduction="none",
                    log_target=True).sum(1)


@dataclass(frozen=True)
class TradesPGD:
    """The inner maximization of TRADES, L∞ (Zhang et al. 2019, "Theoretically Principled
    Trade-off between Robustness and Accuracy", Alg. 1): from x + 0.001·N(0, I), `steps`
    signed-gradient steps of `step_size` (default 2.5ε/steps) on KL(p(x) ‖ p(x')), each
    projected onto the ε-ball and [0, 1]. The labels are not used: the attack moves x'
    away from the model's own prediction on x.
    Shapes: x (N, C, H, W) in [0, 1] -> x_adv (N, C, H, W)."""

    eps: float
    steps: int = 10
    step_size: float | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
        step = self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps
        with eval_mode(model):
            with torch.no_grad():
                clean_logits, _ = logits_of(model, x)
            x_adv = project(x + 0.001 * torch.randn_like(x), x, self.eps)
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                adv_logits, _ = logits_of(model, x_adv)
                (g,) = torch.autograd.grad(kl_clean_adv(clean_logits, adv_logits).sum(), x_adv)
                x_adv = project(x_adv + step * g.sign(), x, self.eps)
            return x_adv.detach()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """(logits, cosines) for a whole tensor, in eval mode, batched."""
    with eval_mode(model):
        outs = [model(x[i: i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def label_accuracy(logits: Tensor, y: Tensor) -> float:
    """Share of rows whose argmax is the label (rejection ignored)."""
    return float((logits.argmax(1).cpu() == y.cpu()).float().mean())


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """A model's accuracy on a whole tensor, in eval mode."""
    return label_accuracy(predict(model, x, batch_size)[0], y)


@torch.no_grad()
def features(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """The feature the last layer sees (`model.feature`), (N, d), in eval mode, on the CPU."""
    dev = next(model.parameters()).device
    with eval_mode(model):
        return torch.cat([model.feature(x[i: i + batch_size].to(dev)).cpu()  # type: ignore[operator]
                          for i in range(0, len(x), batch_size)])


def attack_dataset(model: nn.Module, attack: Callable[[nn.Module, Tensor, Tensor], Tensor],
                   x: Tensor, y: Tensor, batch_size: int = 500) -> Tensor:
    """Run an attack batch by batch over a whole tensor."""
    return torch.cat([attack(model, x[i: i + batch_size], y[i: i + batch_size])
                      for i in range(0, len(x), batch_size)])
