"""Two models compared on the same test images: the difference of a per-example rate (defended, or
robust accuracy, in the worst case) with McNemar's exact test and a bootstrap interval.

Two proportions measured on the same images are paired: what decides is how many images one model
defends and the other does not (the discordant pairs), not each rate's own standard error. McNemar's
exact test asks whether the discordant pairs split evenly (two-sided binomial, p = 1/2); the
percentile bootstrap over images gives a 95 % interval of the difference. Both need each report's
per-example outcomes (`WorstCase.broken`, `.wrong`), recorded by evaluations since they were added.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

from training.evaluation.schema import Report

OUTCOMES = {"defended": "broken", "robust accuracy": "wrong"}  # the rate -> the per-example failure it counts
BOOTSTRAP_SAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class PairedTest:
    outcome: str  # a key of OUTCOMES
    n: int
    rate_a: float
    rate_b: float
    only_a: int  # images a gets right (defended / robust) and b does not
    only_b: int
    p_value: float  # McNemar's exact test, two-sided
    low: float  # bootstrap interval of rate_a - rate_b
    high: float

    @property
    def difference(self) -> float:
        return self.rate_a - self.rate_b


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(a split of the discordant pairs at least this uneven | p = 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_test(a: np.ndarray, b: np.ndarray, outcome: str, seed: int = 0) -> PairedTest:
    """`a`, `b`: per image, True where the model gets it right (defended, or robust)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired outcomes must be two equal non-empty vectors, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    rng = np.random.default_rng(seed)
    d = a.astype(np.float64) - b.astype(np.float64)
    idx = rng.integers(0, len(d), (BOOTSTRAP_SAMPLES, len(d)))
    diffs = d[idx].mean(axis=1)
    low, high = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return PairedTest(outcome, len(a), float(a.mean()), float(b.mean()), only_a, only_b,
                      mcnemar_exact(only_a, only_b), float(low), float(high))


def compare_reports(a: Report, b: Report, outcome: str) -> PairedTest:
    """The paired test of `outcome` between two reports' worst cases; ValueError (why, one line) where
    they are not on the same images or one lacks the per-example outcomes."""
    for r in (a, b):
        if not getattr(r.worst_case, OUTCOMES[outcome]):
            raise ValueError(f"{r.model.name} {r.model.version}: the report has no per-example outcomes "
                             "(evaluated before they were recorded)")
    if (a.split, a.eps, a.worst_case.n_examples) != (b.split, b.eps, b.worst_case.n_examples):
        raise ValueError(f"not the same images: {a.split} n = {a.worst_case.n_examples} at ε {a.eps:g} vs "
                         f"{b.split} n = {b.worst_case.n_examples} at ε {b.eps:g}")
    field = OUTCOMES[outcome]
    right = [np.array([c == "0" for c in getattr(r.worst_case, field)]) for r in (a, b)]
    return paired_test(right[0], right[1], outcome)


def describe(t: PairedTest) -> str:
    """One line: the difference, its interval, the discordant pairs and McNemar's verdict at 5 %."""
    verdict = "a difference (p < 0.05)" if t.p_value < 0.05 else "no significant difference (p ≥ 0.05)"
    return (f"{100 * t.difference:+.1f} points ({100 * t.rate_a:.1f} % vs {100 * t.rate_b:.1f} %, n = {t.n}), "
            f"{int(100 * LEVEL)} % bootstrap interval [{100 * t.low:+.1f}, {100 * t.high:+.1f}]; "
            f"images only the first gets right {t.only_a}, only the second {t.only_b}; McNemar exact "
            f"p = {t.p_value:.3g}: {verdict}")
