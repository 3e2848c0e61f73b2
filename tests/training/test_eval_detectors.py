"""training/evaluation/detectors.py: the standard detection protocol, the misclassification row
kept apart, and the adaptive attack on the other scores."""

from __future__ import annotations

import numpy as np
import torch

from training.evaluation.detectors import Mahalanobis, ScoreAttack, Scores, detector, misclassification_detector
from training.evaluation.scoring import Judged


def _j(correct: list[bool], ratio: list[float]) -> Judged:
    n = len(correct)
    return Judged("x", np.array(correct), np.ones(n, bool), np.ones(n, bool), np.array(ratio), np.full(n, 0.9))


def test_negatives_are_correct_clean_and_positives_their_fooled_versions() -> None:
    clean = _j([True, True, True, False, True], [0.5, 0.6, 0.7, 2.0, 0.8])
    adv = _j([False, True, False, False, False], [1.5, 0.6, 0.9, 3.0, 1.2])
    d = detector("pgd", Scores.of(clean, None), clean, Scores.of(adv, None), adv,
                 Scores.of(clean, None), 1.0, 0.05)
    assert d is not None
    # negatives: rows 0, 1, 2, 4 (row 3 was wrong before the attack); positives: rows 0, 2, 4 (row 3 excluded)
    assert d.n_clean == 4 and d.n_adversarial == 3
    assert d.adversarial_catch_at_rho == 2 / 3  # 1.5 and 1.2 are above rho = 1, 0.9 is not
    assert d.auc == 1.0  # every positive (1.5, 0.9, 1.2) above every negative (0.5, 0.6, 0.7, 0.8)
    assert d.protocol == "correct clean vs fooled attacked"


def test_no_positive_no_detector() -> None:
    clean = _j([True, True], [0.5, 0.6])
    adv = _j([True, True], [0.7, 0.8])
    assert detector("pgd", Scores.of(clean, None), clean, Scores.of(adv, None), adv, Scores.of(clean, None),
                    1.0, 0.05) is None


def test_misclassification_row_scores_clean_wrong_against_clean_right() -> None:
    clean = _j([True, False, True, False], [0.5, 1.5, 0.6, 1.7])
    d = misclassification_detector(Scores.of(clean, None), clean, Scores.of(clean, None), 1.0, 0.05)
    assert d is not None and d.attack == "misclassification (clean)"
    assert d.n_clean == 2 and d.n_adversarial == 2 and d.auc == 1.0 and d.adversarial_catch_at_rho == 1.0


def test_score_attack_stays_in_the_ball_and_wins_when_nothing_is_rejected(tiny_run, fashion_test) -> None:  # type: ignore[no-untyped-def]
    from training.checkpoint import load_checkpoint

    net, _ = load_checkpoint(tiny_run)
    net.eval()
    x, y = fashion_test.images[:32], fashion_test.labels[:32]
    attack = ScoreAttack(0.3, "max softmax probability", threshold=0.0, k=3, steps=10)  # -p <= 0: always accepted
    x_adv = attack(net, x, y)
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    with torch.no_grad():
        assert float((net(x_adv)[0].argmax(1) != y).float().mean()) >= 0.5
    # a threshold nothing meets: the attack cannot win, and keeps an input in the ball all the same
    strict = ScoreAttack(0.3, "max softmax probability", threshold=-1.01, k=2, steps=5)(net, x, y)
    assert float((strict - x).abs().max()) <= 0.3 + 1e-6
    feats = np.random.default_rng(0).normal(size=(100, net.config.fc_dim))
    maha = Mahalanobis.fit(feats, np.arange(100) % 10, 10)
    x_m = ScoreAttack(0.3, "Mahalanobis distance", threshold=1e9, maha=maha, k=2, steps=5)(net, x, y)
    assert float((x_m - x).abs().max()) <= 0.3 + 1e-6
