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

from app.manifest import AngleHistogram
from app.verdict import angles_deg
from training.attacks import predict

HISTOGRAM_BIN_DEG = 2.0  # 90 bins over [0, 180]: a clean class spans 10-20 of them


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


def angle_histogram(theta_deg: np.ndarray, labels: np.ndarray, num_classes: int,
                    bin_deg: float = HISTOGRAM_BIN_DEG) -> AngleHistogram:
    """Per class j, the angles theta_deg[labels == j] counted in equal bins over [0, 180] degrees:
    the distribution that θ*_j and θσ_j summarize (theta_deg, labels: (N,))."""
    edges = np.linspace(0.0, 180.0, int(round(180.0 / bin_deg)) + 1)
    counts = [np.histogram(theta_deg[labels == j], bins=edges)[0].tolist() for j in range(num_classes)]
    return AngleHistogram(bin_edges_deg=edges.tolist(), counts=counts)
