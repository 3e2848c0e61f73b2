"""The verdict rule (app/verdict.py) on tiny arrays: calibrate_rho, angle_ratio and Verdicts rows."""

from __future__ import annotations

import numpy as np
import pytest

from app.verdict import Verdicts, angle_ratio, calibrate_rho, geodesic_verdict


def reject_rate(ratios: np.ndarray, rho: float) -> float:
    return float(np.mean(ratios > rho))


def test_calibrate_rho_on_a_known_set() -> None:
    ratios = np.random.default_rng(0).permutation(np.arange(1, 101) / 100)  # 0.01 .. 1.00
    rho = calibrate_rho(ratios, 0.05)
    assert rho == pytest.approx(0.95)  # the 5 largest (0.96 .. 1.00) are rejected
    assert reject_rate(ratios, rho) == pytest.approx(0.05)


@pytest.mark.parametrize("target", [0.01, 0.05, 0.3, 0.99])
@pytest.mark.parametrize("n", [1, 7, 200])
@pytest.mark.parametrize("seed", [0, 1])
def test_calibrate_rho_is_the_smallest_rho_within_the_target(seed: int, n: int, target: float) -> None:
    # rounded: ties among the ratios must not change the answer's properties
    ratios = np.round(np.random.default_rng(seed).gamma(4.0, 0.25, n), 1)
    rho = calibrate_rho(ratios, target)
    assert rho in ratios
    assert reject_rate(ratios, rho) <= target
    assert reject_rate(ratios, float(np.nextafter(rho, -np.inf))) > target  # any smaller rho rejects more


def test_calibrate_rho_below_one_rejection_rejects_nothing() -> None:
    ratios = np.array([0.5, 2.0, 1.0])
    assert calibrate_rho(ratios, 0.1) == 2.0 and reject_rate(ratios, 2.0) == 0.0


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_calibrate_rho_refuses_a_target_outside_0_1(target: float) -> None:
    with pytest.raises(ValueError, match=r"target_reject_rate must be in \(0, 1\)"):
        calibrate_rho([1.0, 2.0], target)


def _batch(seed: int, n: int = 64, k: int = 5) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    cosines = rng.uniform(-1, 1, (n, k))
    logits = 3.0 * cosines + rng.normal(0, 0.1, (n, k))
    mean, std = rng.uniform(20, 60, k), rng.uniform(1, 10, k)
    return logits, cosines, mean, std


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrated_rho_applied_by_the_verdict_keeps_the_target(seed: int) -> None:
    """The verdict rejects iff angle_ratio > rho, so rho calibrated on the ratios of a set
    rejects at most the target fraction of that set."""
    logits, cosines, mean, std = _batch(seed)
    ratios = angle_ratio(logits, cosines, mean, std)
    rho = calibrate_rho(ratios, 0.2)
    v = geodesic_verdict(logits, cosines, mean, std, rho)
    np.testing.assert_array_equal(v.accepted, ratios <= rho)
    assert 1 - v.accepted.mean() <= 0.2


def test_verdicts_rows_and_concat_give_back_the_batch() -> None:
    v = geodesic_verdict(*_batch(3), 1.0)
    assert len(v) == 64
    parts = [v[0:10], v[10:11], v[11:64]]
    assert [len(p) for p in parts] == [10, 1, 53]
    whole = Verdicts.concat(parts)
    for name in ("labels", "angles_deg", "thresholds_deg", "accepted", "probabilities", "class_probabilities"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(v, name))
    assert v[5:7].names() == ["accept" if a else "reject" for a in v.accepted[5:7]]


def test_class_probabilities_are_the_softmax_whose_argmax_is_the_label() -> None:
    logits, cosines, mean, std = _batch(5)
    v = geodesic_verdict(logits, cosines, mean, std, 1.0)
    z = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(v.class_probabilities, z / z.sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_array_equal(v.class_probabilities.argmax(axis=1), v.labels)
    np.testing.assert_array_equal(v.probabilities, v.class_probabilities[np.arange(len(v)), v.labels])


def test_calibrate_rho_on_rejects_exactly_the_target_despite_rounding() -> None:
    """rho * (mean + std) can round just below theta for the input whose ratio is rho; the
    calibrated rate must still be exact: at most floor(target * n) rejections, ties included."""
    from app.verdict import calibrate_rho_on

    rng = np.random.default_rng(0)
    k, over = 10, 0
    for trial in range(2000):
        n = int(rng.integers(20, 200))
        mean, std = rng.uniform(30, 70, k), rng.uniform(2, 9, k)
        cos = rng.uniform(0.05, 0.95, (n, k))
        if trial % 3 == 0:  # ties: repeated rows
            cos[n // 2:] = cos[: n - n // 2]
        logits = cos * 10
        target = float(rng.choice([0.01, 0.05, 0.1, 0.2]))
        rho = calibrate_rho_on(logits, cos, mean, std, target)
        rejected = int((~geodesic_verdict(logits, cos, mean, std, rho).accepted).sum())
        assert rejected <= int(np.floor(target * n))
        over += int(rejected > int(np.floor(target * n)))
        v1 = geodesic_verdict(logits, cos, mean, std, 1.0)
        if rho > calibrate_rho(v1.angles_deg / v1.thresholds_deg, target):  # raised: by no more than needed
            below = float(np.nextafter(rho, 0))
            assert int((~geodesic_verdict(logits, cos, mean, std, below).accepted).sum()) > int(np.floor(target * n))
    assert over == 0


def test_calibrate_rho_alone_can_round_one_rejection_over_the_target() -> None:
    """Why calibrate_rho_on exists: somewhere in these trials the ratio-based rho rejects one
    input more than allowed (theta > fl(rho * base) although theta / base == rho)."""
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(4000):
        n = 50
        base = rng.uniform(30, 80, n)
        theta = rng.uniform(20, 90, n)
        rho = calibrate_rho(theta / base, 0.1)
        found += int(np.count_nonzero(theta > rho * base) > 5)
    assert found > 0
