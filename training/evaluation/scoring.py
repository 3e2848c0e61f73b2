"""Judging attacked inputs as the service would (ONNX Runtime outputs, the manifest's angle
statistics and rho, the one rule app.verdict.geodesic_verdict), and the rates of a report.

Rates, as fractions of the attacked examples: robust accuracy (label correct, rejection
ignored), reject rate, defended rate (rejected OR correct), success rate (accepted AND
wrong, = 1 - defended: the attacker's win).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from app.verdict import Verdicts, angle_ratio, softmax
from training.evaluation.schema import Report, WorstCase
from training.judging import BatchedRunner, Rates
from training.rule import Rule


@dataclass
class Verdicted:
    """Per-example outcome of a set of inputs under the served rule: what the worst case reads."""

    name: str
    correct: np.ndarray  # (n,) bool: predicted label == true label
    accepted: np.ndarray  # (n,) bool at rho

    @classmethod
    def of(cls, name: str, v: Verdicts, y: np.ndarray) -> Verdicted:
        """From verdicts on the first len(v) examples of labels y."""
        return cls(name, v.labels == y[: len(v.labels)], v.accepted)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def broken(self) -> np.ndarray:
        return self.accepted & ~self.correct


@dataclass
class Judged(Verdicted):
    """Per-example outcome of an attack (ONNX Runtime verdicts)."""

    accepted_rho1: np.ndarray  # (n,) bool at rho = 1
    ratio: np.ndarray  # (n,) angle ratio theta / (theta* + theta_sigma)
    msp: np.ndarray  # (n,) maximum softmax probability of the logits

    def take(self, keep: np.ndarray, name: str | None = None) -> Judged:
        """The examples where `keep` (bool (n,) or indices) holds."""
        return Judged(name or self.name, self.correct[keep], self.accepted[keep], self.accepted_rho1[keep],
                      self.ratio[keep], self.msp[keep])

    def where(self, take: np.ndarray, other: Judged) -> Judged:
        """Per example, `other`'s outcome where `take` holds, else this one's."""
        def pick(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.where(take, b, a)
        return Judged(self.name, pick(self.correct, other.correct), pick(self.accepted, other.accepted),
                      pick(self.accepted_rho1, other.accepted_rho1), pick(self.ratio, other.ratio),
                      pick(self.msp, other.msp))

    def attacker_best(self, other: Judged) -> np.ndarray:
        """Where `other` is better for the attacker under the served rule: accepted-and-wrong
        first, then misclassified (rejected)."""
        return (other.broken & ~self.broken) | (~other.correct & self.correct & ~self.broken)

    def padded(self, n: int, rest: Judged, name: str | None = None) -> Judged:
        """These outcomes for the first rows, `rest`'s (e.g. the clean ones) up to n rows."""
        def cat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.concatenate([a[:n], b[len(a):n]])
        return Judged(name or self.name, cat(self.correct, rest.correct), cat(self.accepted, rest.accepted),
                      cat(self.accepted_rho1, rest.accepted_rho1), cat(self.ratio, rest.ratio),
                      cat(self.msp, rest.msp))


@dataclass
class Outcome:
    """An evaluation's report and the per-example outcomes behind it (for the figures)."""

    report: Report
    judged: dict[str, Judged] = field(default_factory=dict)
    clean: Judged | None = None
    sweep: list[tuple[float, Judged]] = field(default_factory=list)
    ran: dict[str, Any] = field(default_factory=dict)  # attack name -> the attack object that ran


def judge(onnx_model: BatchedRunner, x: Tensor, y: Tensor, rule: Rule, name: str) -> Judged:
    """x's outcomes as the service would answer (the model's outputs, the served rule)."""
    logits, cosines = onnx_model(x)
    v, v1 = rule.verdicts(logits, cosines), rule.verdicts(logits, cosines, rho=1.0)
    return Judged(name, v.labels == y.cpu().numpy(), v.accepted, v1.accepted,
                  angle_ratio(logits, cosines, rule.angle_mean_deg, rule.angle_std_deg), max_softmax(logits))


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """max_j softmax(z)_j per row, (N, K) -> (N,): the service's softmax (app.verdict)."""
    out: np.ndarray = softmax(logits).max(axis=1)
    return out


def rate_fields(j: Judged) -> dict[str, Any]:
    r, r1 = Rates.of(j.correct, j.accepted), Rates.of(j.correct, j.accepted_rho1)
    return dict(
        n_examples=j.n,
        robust_accuracy=r.accuracy,
        reject_rate=r.reject_rate,
        defended_rate=r.defended_rate,
        success_rate=r.success_rate,
        accepted_accuracy=r.accepted_accuracy,
        rho1_reject_rate=r1.reject_rate,
        rho1_defended_rate=r1.defended_rate,
    )


def worst_case(judged: Sequence[Verdicted], n: int | None = None, note: str = "") -> WorstCase:
    """Per example, the worst outcome over every set of inputs that covers it (broken if any made
    it accepted-and-wrong, not robust if any misclassified it), over the first n examples
    (default: those every set covered). The one worst case of reports and precision records."""
    m = min(j.n for j in judged) if n is None else n
    broken = np.zeros(m, bool)
    wrong = np.zeros(m, bool)
    for j in judged:
        k = min(m, j.n)
        broken[:k] |= j.broken[:k]
        wrong[:k] |= ~j.correct[:k]
    return WorstCase(n_examples=m, attacks=[j.name for j in judged], robust_accuracy=float((~wrong).mean()),
                     defended_rate=float((~broken).mean()), success_rate=float(broken.mean()), note=note,
                     broken=bits(broken), wrong=bits(wrong))


def bits(flags: np.ndarray) -> str:
    """Booleans as a string of "0" and "1" (a report's per-example outcomes)."""
    return "".join("1" if f else "0" for f in np.asarray(flags, bool).tolist())


def roc_auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): area under the ROC of 'score > threshold'."""
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks for ties
    i = 0
    while i < len(sorted_v):
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
