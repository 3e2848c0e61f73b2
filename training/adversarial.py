"""What one training step minimizes, per training mode (docs/METHOD.md, "Training").

- natural: the head's loss on x.
- fgsm:    (1-w) ℓ(x) + w ℓ(x_adv), x_adv from FGSM with a random start (Wong et al. 2020).
- pgd:     (1-w) ℓ(x) + w ℓ(x_adv), x_adv from PGD-k (Madry et al. 2018).
- nfgsm:   ℓ(x_adv) alone, x_adv from N-FGSM (de Jorge et al. 2022): noise of radius 2ε, one
           step of ε, no projection. All of the loss is on the adversarial input.
- trades:  ℓ(x) + β · mean KL(p(x) ‖ p(x_adv)), x_adv maximizing that KL by PGD-k
           (Zhang et al. 2019).
- rejection: the served verdict trained with the classifier (training/rejection.py): clean
           inputs inside their cone, attacked inputs correct or rejected, synthetic outliers
           rejected.

ℓ is the head's loss (`objectives.head_loss`: cross-entropy, plus the weight multiplier's
penalty or loss annealing). The attack runs on the bare module in eval mode; the loss is one
forward of `net` (the module, or its DistributedDataParallel wrapper) in train mode, over
[x; x_adv] when both are needed, so that DDP sees one forward per backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.attacks import FGSM, NFGSM, PGD, TradesPGD, kl_clean_adv
from training.models import ConvNet
from training.objectives import ObjectiveConfig, head_loss

MODES = ("natural", "fgsm", "pgd", "nfgsm", "trades", "rejection")


def adversarial_input(model: nn.Module, x: Tensor, y: Tensor, mode: str, eps: float, steps: int,
                      step_size: float | None) -> Tensor:
    """The attacked batch a mode trains on (x itself for natural training or ε = 0)."""
    if mode == "natural" or eps <= 0:
        return x
    if mode == "fgsm":
        return FGSM(eps, random_start=True, step_size=step_size)(model, x, y)
    if mode == "nfgsm":
        return NFGSM(eps, step_size=step_size)(model, x, y)
    if mode == "trades":
        return TradesPGD(eps, steps=steps, step_size=step_size)(model, x)
    if mode == "pgd":
        return PGD(eps, steps=steps, step_size=step_size)(model, x, y)
    raise ValueError(f"unknown training mode {mode!r}; expected one of {', '.join(MODES)}")


def training_loss(model: ConvNet, net: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, mode: str, *,
                  adv_weight: float, trades_beta: float, iteration: int,
                  objective: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """(loss, logits on the input the accuracy is tracked on) for one batch, in train mode."""
    model.train()
    if x_adv is x or mode == "nfgsm" or (mode in ("fgsm", "pgd") and adv_weight >= 1.0):
        logits, _ = net(x_adv)
        return head_loss(model, logits, y, iteration, objective), logits
    n = len(x)
    both, _ = net(torch.cat([x, x_adv]))
    clean = head_loss(model, both, y, iteration, objective, rows=slice(0, n))
    if mode == "trades":
        return clean + trades_beta * kl_clean_adv(both[:n], both[n:]).mean(), both[n:]
    adv = head_loss(model, both, y, iteration, objective, rows=slice(n, None))
    return (1 - adv_weight) * clean + adv_weight * adv, both[n:]
