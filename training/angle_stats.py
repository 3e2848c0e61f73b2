"""Angle statistics of robust geodesic inference on the torch side (docs/METHOD.md §4).

After training, for every class j: the mean θ*_j and standard deviation θσ_j (degrees) of
the angles between the features of all class-j training samples and W_j. The verdict rule
that uses them lives in app/verdict.py (NumPy); export and evaluation apply it to the
model's outputs, so the service and the training side share one definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from app.verdict import angles_deg
from training.attacks import predict


@dataclass(frozen=True)
class AngleStats:
    mean_deg: tuple[float, ...]  # θ*_j
    std_deg: tuple[float, ...]  # θσ_j
    counts: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AngleStats:
        return cls(tuple(d["mean_deg"]), tuple(d["std_deg"]), tuple(d["counts"]))


def true_class_angles(cosines: Tensor, y: Tensor) -> np.ndarray:
    """Angle (degrees) between each feature and the weight of its TRUE class: (N,)."""
    return angles_deg(cosines.gather(1, y.view(-1, 1)).squeeze(1).double().cpu().numpy())


def compute_angle_stats(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 1000) -> AngleStats:
    """θ*_j, θσ_j over all samples of each class (population std)."""
    _, cosines = predict(model, x, batch_size)
    theta = true_class_angles(cosines, y)
    labels = y.cpu().numpy()
    means, stds, counts = [], [], []
    for j in range(num_classes):
        t = theta[labels == j]
        means.append(float(t.mean()) if len(t) else 90.0)
        stds.append(float(t.std()) if len(t) else 0.0)
        counts.append(int(len(t)))
    return AngleStats(tuple(means), tuple(stds), tuple(counts))
