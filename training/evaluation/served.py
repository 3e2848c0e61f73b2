"""What the white-box attacks judge their iterates by: the served model's outputs (model.onnx on
ONNX Runtime), so that the input each example keeps is the one the service would answer worst for,
not the one the PyTorch twin would (`ServedOutputs`, `served_outputs`), and `ServedScore`, the
score training.attacks.PGD keeps its best iterate by."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.judging import BatchedRunner
from training.rule import Rule

Outputs = Callable[[Tensor], tuple[Tensor, Tensor]]  # x -> (logits, cosines) of the served model


class ServedOutputs:
    """The served model's outputs (model.onnx on ONNX Runtime) for x, as tensors on x's device: what
    the white-box attacks judge their iterates by, so that the input kept is the one the service
    would answer worst for."""

    def __init__(self, runner: BatchedRunner) -> None:
        self.runner = runner

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, cosines = self.runner(x.detach().cpu())
        return torch.from_numpy(logits).to(x.device), torch.from_numpy(cosines).to(x.device)


def served_outputs(judge: Outputs | None, x: Tensor, logits: Tensor, cosines: Tensor) -> tuple[Tensor, Tensor]:
    """`judge`'s outputs for x, or (no judge) the attacked model's own."""
    return (logits.detach(), cosines.detach()) if judge is None else judge(x.detach())


@dataclass(frozen=True)
class ServedScore:
    """A training.attacks.ScoreFn on the served outputs: how good an iterate is for the attacker
    under the served rule, accepted-and-wrong first, then misclassified, then the cross-entropy."""

    judge: Outputs
    rule: Rule

    def __call__(self, x: Tensor, logits: Tensor, cosines: Tensor | None, y: Tensor) -> Tensor:
        lg, cs = self.judge(x)
        v = self.rule.verdicts(lg, cs)
        wrong = torch.from_numpy(v.labels).to(x.device) != y
        accepted = torch.from_numpy(v.accepted).to(x.device)
        return F.cross_entropy(lg, y, reduction="none") + 1e6 * wrong + 2e6 * (wrong & accepted)
