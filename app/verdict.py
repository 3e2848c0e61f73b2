"""Robust geodesic inference (paper §4): the verdict rule, defined once.

    y_hat     = argmax logits
    theta     = degrees(acos(cosines[y_hat]))
    threshold = rho * (angle_mean_deg[y_hat] + angle_std_deg[y_hat])
    reject   iff theta > threshold

NumPy only: the service applies it to the inference runtime's outputs, and training/ applies
the very same function to PyTorch outputs (export metrics, evaluation), so the
numbers in a manifest are what the service computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

VerdictName = Literal["accept", "reject"]
ReasonName = Literal["angle", "query_history"]


@dataclass(frozen=True)
class Verdicts:
    """Per-example verdicts for a batch of N inputs; `len` is N, `v[a:b]` its rows a..b-1."""

    labels: NDArray[np.int64]  # (N,)
    angles_deg: NDArray[np.float64]  # (N,)
    thresholds_deg: NDArray[np.float64]  # (N,)
    accepted: NDArray[np.bool_]  # (N,)
    probabilities: NDArray[np.float64]  # (N,) softmax probability of the label
    class_probabilities: NDArray[np.float64]  # (N, K) softmax probability of every class
    # (N,) rejected by the service's query-history detector: the model's answer is not given out
    # (app/service.py); None (the rule alone): no row
    withheld: NDArray[np.bool_] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.withheld is None:
            object.__setattr__(self, "withheld", np.zeros(len(self.labels), np.bool_))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: slice) -> Verdicts:
        return Verdicts(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def concat(parts: Sequence[Verdicts]) -> Verdicts:
        """The rows of `parts`, in order."""
        return Verdicts(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Verdicts)})

    def names(self) -> list[VerdictName]:
        """Each verdict as the API answers it and the metrics label it: "accept" or "reject"."""
        return ["accept" if ok else "reject" for ok in self.accepted.tolist()]

    def reasons(self) -> list[ReasonName | None]:
        """Why each input is rejected: "query_history" (the service's query-history detector: its
        answer withheld, whatever the rule says), "angle" (the rule above); None when accepted."""
        angle = (self.angles_deg > self.thresholds_deg).tolist()
        return [None if ok and not w else ("query_history" if w or not a else "angle")
                for ok, a, w in zip(self.accepted.tolist(), angle, self.withheld.tolist(), strict=True)]


def softmax(logits: NDArray[np.floating]) -> NDArray[np.float64]:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out


def angles_deg(cosines: ArrayLike) -> NDArray[np.float64]:
    # Clip: a float32 cosine may exceed 1 by an ulp, and acos would give NaN.
    out: NDArray[np.float64] = np.degrees(np.arccos(np.clip(np.asarray(cosines, np.float64), -1.0, 1.0)))
    return out


def geodesic_verdict(
    logits: ArrayLike,
    cosines: ArrayLike,
    angle_mean_deg: ArrayLike,
    angle_std_deg: ArrayLike,
    rho: float,
) -> Verdicts:
    """Apply the rule above to logits and cosines of shape (N, K)."""
    logits_a = np.asarray(logits)
    cosines_a = np.asarray(cosines)
    if logits_a.ndim != 2 or logits_a.shape != cosines_a.shape:
        raise ValueError(f"logits and cosines must both be (N, K); got {logits_a.shape}, {cosines_a.shape}")
    mean = np.asarray(angle_mean_deg, np.float64)
    std = np.asarray(angle_std_deg, np.float64)
    labels = logits_a.argmax(axis=1).astype(np.int64)
    rows = np.arange(len(labels))
    theta = angles_deg(cosines_a[rows, labels])
    threshold = rho * (mean[labels] + std[labels])
    class_probs = softmax(logits_a)
    return Verdicts(labels, theta, threshold, theta <= threshold, class_probs[rows, labels], class_probs)


def angle_ratio(
    logits: ArrayLike, cosines: ArrayLike, angle_mean_deg: ArrayLike, angle_std_deg: ArrayLike
) -> NDArray[np.float64]:
    """theta / (mean + std) of the predicted class: the verdict rejects iff ratio > rho."""
    v = geodesic_verdict(logits, cosines, angle_mean_deg, angle_std_deg, 1.0)
    out: NDArray[np.float64] = v.angles_deg / v.thresholds_deg
    return out


def calibrate_rho(ratios: ArrayLike, target_reject_rate: float) -> float:
    """Smallest rho whose reject rate (ratio > rho) on `ratios` is at most the target."""
    r = np.sort(np.asarray(ratios, np.float64))
    if not 0 < target_reject_rate < 1:
        raise ValueError("target_reject_rate must be in (0, 1)")
    n = len(r)
    allowed = int(np.floor(target_reject_rate * n))  # number of rejections we may make
    # rejecting the `allowed` largest ratios: rho = the (n - allowed)-th smallest ratio
    return float(r[n - allowed - 1]) if allowed < n else float(r[0])


def calibrate_rho_on(
    logits: ArrayLike,
    cosines: ArrayLike,
    angle_mean_deg: ArrayLike,
    angle_std_deg: ArrayLike,
    target_reject_rate: float,
) -> float:
    """rho whose verdicts reject at most `target_reject_rate` of these inputs, exactly as
    `geodesic_verdict` computes them: theta > rho * (mean + std). `calibrate_rho` picks rho
    from the ratios theta / (mean + std); the product rho * (mean + std) can round just below
    theta and reject that input as well, so rho is raised by the fewest ulps that undo it."""
    v = geodesic_verdict(logits, cosines, angle_mean_deg, angle_std_deg, 1.0)
    theta, base = v.angles_deg, v.thresholds_deg
    rho = calibrate_rho(theta / base, target_reject_rate)
    allowed = int(np.floor(target_reject_rate * len(theta)))
    while np.count_nonzero(theta > rho * base) > allowed:
        rho = float(np.nextafter(rho, np.inf))
    return rho
