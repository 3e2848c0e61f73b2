"""training/evaluation/sanity.py: the checks of the attacks on the verdict, Square against the
white-box attacks, and the noise check on a real ONNX model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from support.fake_store import build_model
from training.evaluation.sanity import gradient_free_check, noise_check, rule_checks
from training.evaluation.scoring import Judged
from training.judging import OnnxModel
from training.rule import Rule


def _j(name: str, correct: list[bool], accepted: list[bool]) -> Judged:
    n = len(correct)
    return Judged(name, np.array(correct), np.array(accepted), np.array(accepted), np.ones(n), np.ones(n))


def test_rule_checks_pass_when_converged_and_square_is_weaker() -> None:
    rule = _j("rule", [False, True, True, True], [True, True, True, True])  # defended 3/4
    square = _j("rule-square", [True, True, True, True], [True, True, True, True])  # defended 4/4
    schedule = [{"restarts": 1, "defended_rate": 0.76}, {"restarts": 2, "defended_rate": 0.755}]
    c = rule_checks({"rule": rule, "rule-square": square}, schedule, 0.01)
    assert c.ok and c.budget_ok and c.gradient_free_ok
    assert c.square_defended_rate == 1.0 and c.white_box_defended_rate == 0.75


def test_rule_checks_fail_when_doubling_still_helps_or_square_is_stronger() -> None:
    rule = _j("rule", [True] * 200, [True] * 200)  # defended 100 %
    square = _j("rule-square", [False] * 100 + [True] * 100, [True] * 200)  # defended 50 %
    schedule = [{"restarts": 1, "defended_rate": 0.80}, {"restarts": 2, "defended_rate": 0.75}]
    c = rule_checks({"rule": rule, "rule-square": square}, schedule, 0.01)
    assert not c.ok and c.budget_ok is False and c.gradient_free_ok is False
    assert c.verdict.startswith("FAILED") and "STRONGER" in c.verdict and "MORE than" in c.verdict


def test_gradient_free_check_compares_square_with_the_best_white_box_attack() -> None:
    judged = {"square": _j("square", [True] * 50 + [False] * 50, [True] * 100),
              "pgd-100": _j("pgd-100", [True] * 60 + [False] * 40, [True] * 100),
              "fgsm": _j("fgsm", [True] * 80 + [False] * 20, [True] * 100)}
    c = gradient_free_check(judged)
    assert not c.ok and c.best_white_box == "pgd-100" and c.square_robust_accuracy == 0.5
    judged["square"] = _j("square", [True] * 70 + [False] * 30, [True] * 100)
    assert gradient_free_check(judged).ok


def test_noise_check_rejects_noise_on_the_fixture_model(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(build_model())
    # the fixture: noise lands near 60 degrees from every class; thresholds rho * (10 + 5) = 15 degrees
    c = noise_check(OnnxModel(path), (1, 28, 28), Rule((10.0,) * 10, (5.0,) * 10, 1.0), n=200)
    assert c.n_uniform == 200 and c.uniform_reject_rate == pytest.approx(1.0) and c.ok
    loose = noise_check(OnnxModel(path), (1, 28, 28), Rule((10.0,) * 10, (5.0,) * 10, 100.0), n=200)
    assert loose.uniform_reject_rate == 0.0 and not loose.ok and loose.verdict.startswith("FAILED")
