"""training/evaluation/scoring.py: per-example outcomes, their merge by the served rule, rates,
the worst case per example and the AUROC, on small hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation.scoring import Judged, max_softmax, rate_fields, roc_auc, worst_case


def judged(name: str, correct: list[bool], accepted: list[bool]) -> Judged:
    n = len(correct)
    return Judged(name, np.array(correct), np.array(accepted), np.array(accepted), np.linspace(0.5, 1.5, n),
                  np.full(n, 0.9))


def test_attacker_best_prefers_accepted_and_wrong_then_wrong() -> None:
    a = judged("a", [True, False, True, False, True], [True, False, True, True, False])
    b = judged("b", [False, False, False, True, True], [True, True, False, True, True])
    # row 0: b broken, a correct -> b; row 1: a wrong-rejected, b broken -> b; row 2: a correct, b wrong-rejected
    # -> b (misclassified beats correct); row 3: a broken -> keep a; row 4: both correct -> keep a
    np.testing.assert_array_equal(a.attacker_best(b), [True, True, True, False, False])
    merged = a.where(a.attacker_best(b), b)
    np.testing.assert_array_equal(merged.broken, [True, True, False, True, False])


def test_padded_keeps_the_attack_rows_and_fills_from_the_rest() -> None:
    clean = judged("clean", [True] * 5, [True] * 5)
    part = judged("doubled", [False, True], [True, True])
    p = part.padded(5, clean)
    assert p.n == 5 and p.name == "doubled"
    np.testing.assert_array_equal(p.correct, [False, True, True, True, True])


def test_rate_fields_add_up() -> None:
    j = judged("x", [True, True, False, False, True, False], [True, False, True, False, True, True])
    r = rate_fields(j)
    assert r["robust_accuracy"] == pytest.approx(3 / 6) and r["reject_rate"] == pytest.approx(2 / 6)
    assert r["success_rate"] == pytest.approx(2 / 6) and r["defended_rate"] == pytest.approx(4 / 6)
    assert r["accepted_accuracy"] == pytest.approx(2 / 4)
    assert rate_fields(judged("none", [True, False], [False, False]))["accepted_accuracy"] is None


def test_worst_case_is_per_example_over_attacks() -> None:
    clean = judged("clean", [True, True, True, False], [True, True, True, False])
    a = judged("a", [False, True, True, False], [True, True, True, False])  # breaks row 0
    b = judged("b", [True, False, True], [True, False, True])  # wrong-rejected row 1, covers 3 rows
    wc = worst_case([clean, a, b])
    assert wc.n_examples == 3 and wc.attacks == ["clean", "a", "b"]
    assert wc.robust_accuracy == pytest.approx(1 / 3)  # only row 2 survives every attack
    assert wc.defended_rate == pytest.approx(2 / 3)  # row 0 broken by a
    full = worst_case([clean, a, b], n=4)
    assert full.n_examples == 4 and full.defended_rate == pytest.approx(3 / 4)


def test_roc_auc_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    neg, pos = rng.integers(0, 5, 40).astype(float), rng.integers(2, 8, 30).astype(float)
    pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for p in pos for q in neg]
    assert roc_auc(neg, pos) == pytest.approx(np.mean(pairs))
    assert np.isnan(roc_auc(neg, np.array([])))


def test_max_softmax_is_the_largest_softmax_probability() -> None:
    z = np.array([[0.0, 0.0], [10.0, 0.0], [1000.0, -1000.0]])
    np.testing.assert_allclose(max_softmax(z), [0.5, 1 / (1 + np.exp(-10)), 1.0])
