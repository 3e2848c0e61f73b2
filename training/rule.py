"""The served rule on the torch side, defined once: `Rule` (per-class thresholds
τ_k = ρ (θ*_k + θσ_k), the verdicts of app.verdict.geodesic_verdict on PyTorch or ONNX outputs),
`Rule.of` (the rule a manifest ships), `measure_rule` (the rule export would ship for a model
now), and the attacker's side of it: `rule_margins`, `rule_objective` and `cosine_hinge`.

Rejection training (training/rejection.py), the guard, the evaluation, its sanity checks and
precision records all take the rule from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.verdict import Verdicts, geodesic_verdict
from training.attacks import eval_mode, predict


class ShipsRule(Protocol):
    """What carries a served rule: a manifest (app.manifest.Manifest) or an evaluation report."""

    @property
    def angle_mean_deg(self) -> Any: ...

    @property
    def angle_std_deg(self) -> Any: ...

    @property
    def rho(self) -> float: ...


def _array(a: Tensor | np.ndarray) -> np.ndarray:
    return a.detach().double().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a, dtype=np.float64)


@dataclass(frozen=True)
class Rule:
    """The served rule as the attacker, the guard and the evaluation see it: per-class
    thresholds τ_k = ρ (θ*_k + θσ_k) in degrees."""

    angle_mean_deg: tuple[float, ...]
    angle_std_deg: tuple[float, ...]
    rho: float

    @classmethod
    def of(cls, source: ShipsRule | dict[str, Any], rho: float | None = None) -> Rule:
        """The rule a manifest (or a report, or a saved `state()`) carries; `rho` overrides its ρ."""
        d = source if isinstance(source, dict) else {k: getattr(source, k) for k in ("angle_mean_deg",
                                                                                     "angle_std_deg", "rho")}
        return cls(tuple(float(v) for v in d["angle_mean_deg"]), tuple(float(v) for v in d["angle_std_deg"]),
                   float(d["rho"] if rho is None else rho))

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def cos_thresholds(self, device: torch.device | None = None) -> Tensor:
        tau = [min(180.0, self.rho * (m + s)) for m, s in zip(self.angle_mean_deg, self.angle_std_deg, strict=True)]
        return torch.cos(torch.deg2rad(torch.tensor(tau, dtype=torch.float32))).to(device)

    def verdicts(self, logits: Tensor | np.ndarray, cosines: Tensor | np.ndarray, rho: float | None = None) -> Verdicts:
        """app.verdict.geodesic_verdict (the service's rule) on PyTorch or ONNX outputs, at this
        rule's ρ or the given one."""
        return geodesic_verdict(_array(logits), _array(cosines), self.angle_mean_deg, self.angle_std_deg,
                                self.rho if rho is None else rho)

    def broken(self, logits: Tensor | np.ndarray, cosines: Tensor | np.ndarray, y: Tensor | np.ndarray) -> np.ndarray:
        """Accepted with a wrong label."""
        v = self.verdicts(logits, cosines)
        return v.accepted & (v.labels != _labels(y))


def _labels(y: Tensor | np.ndarray) -> np.ndarray:
    return y.cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)


def measure_rule(model: nn.Module, x_stats: Tensor, y_stats: Tensor, x_calib: Tensor,
                 target_reject_rate: float) -> Rule:
    """The rule export would ship for `model` now: θ*, θσ on (x_stats, y_stats), ρ calibrated to
    `target_reject_rate` on x_calib (app.verdict's rule, exactly)."""
    from training.angle_stats import compute_angle_stats
    from training.judging import calibrate

    k = int(getattr(getattr(model, "config", None), "num_classes", 10))
    with eval_mode(model), torch.no_grad():
        stats = compute_angle_stats(model, x_stats, y_stats, k)
        logits, cos = predict(model, x_calib)
    rho = calibrate(logits.double().cpu().numpy(), cos.double().cpu().numpy(), stats.mean_deg, stats.std_deg,
                    target_reject_rate).rho
    return Rule.of({"angle_mean_deg": stats.mean_deg, "angle_std_deg": stats.std_deg, "rho": rho})


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


def cosine_hinge(logits: Tensor, cosines: Tensor, t: Tensor, c: float = 10.0, margin: float = 0.5) -> Tensor:
    """cos(x, W_t) − c·relu(max_{j≠t} z_j − z_t + margin), (N,): the feature pushed into target t's
    cone while t stays the predicted label; the attacker maximizes it."""
    cos_t = cosines.gather(1, t.view(-1, 1)).squeeze(1)
    logit_t = logits.gather(1, t.view(-1, 1)).squeeze(1)
    other = logits.masked_fill(F.one_hot(t, logits.shape[1]).bool(), -float("inf")).amax(1)
    return cos_t - c * torch.relu(other - logit_t + margin)
