"""FGSM / PGD invariants on a small trained model, and a cross-check of our PGD against
adversarial-robustness-toolbox's ProjectedGradientDescent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.attacks import FGSM, PGD, attack_dataset, predict
from training.checkpoint import load_checkpoint
from training.data import Dataset
from training.models import LogitsOnly

EPS = 0.1


@pytest.fixture(scope="module")
def model_and_data(tiny_run: Path, fashion_test: Dataset) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model, _ = load_checkpoint(tiny_run)
    return model, fashion_test.images[:300], fashion_test.labels[:300]


def robust_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    logits, _ = predict(model, x)
    return float((logits.argmax(1) == y).float().mean())


@pytest.mark.parametrize("attack", [FGSM(EPS), FGSM(EPS, random_start=True), PGD(EPS, steps=5, restarts=2)])
def test_attack_stays_in_eps_ball_and_unit_box(model_and_data, attack) -> None:
    model, x, y = model_and_data
    model.train()  # the attack must restore this
    x_adv = attack_dataset(model, attack, x, y, batch_size=128)
    assert model.training
    assert x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    model.eval()
    assert robust_accuracy(model, x_adv, y) <= robust_accuracy(model, x, y)


def test_pgd_at_least_as_strong_as_fgsm(model_and_data) -> None:
    model, x, y = model_and_data
    torch.manual_seed(0)
    fgsm = robust_accuracy(model, attack_dataset(model, FGSM(EPS), x, y), y)
    pgd = robust_accuracy(model, attack_dataset(model, PGD(EPS, steps=10), x, y), y)
    clean = robust_accuracy(model, x, y)
    assert clean > 0.5
    assert pgd <= fgsm + 0.01
    assert pgd < clean


def test_pgd_agrees_with_art(model_and_data) -> None:
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    model, x, y = model_and_data
    model.eval()
    steps, step = 10, 2.5 * EPS / 10
    torch.manual_seed(0)
    ours = robust_accuracy(model, attack_dataset(model, PGD(EPS, steps=steps, step_size=step), x, y), y)
    clf = PyTorchClassifier(LogitsOnly(model), loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                            nb_classes=10, clip_values=(0.0, 1.0))
    art_pgd = ProjectedGradientDescent(clf, norm=np.inf, eps=EPS, eps_step=step, max_iter=steps,
                                       num_random_init=1, batch_size=150, verbose=False)
    x_art = torch.from_numpy(art_pgd.generate(x.numpy(), y=y.numpy()))
    theirs = robust_accuracy(model, x_art, y)
    assert abs(ours - theirs) <= 0.02, (ours, theirs)


def test_pgd_with_a_score_keeps_each_examples_best_iterate() -> None:
    """The same trajectory (same seed), but each example keeps its best iterate by the score: every
    example the last iterate misclassifies stays misclassified, and the score is never lower."""
    from training.attacks import misclassified_first
    from training.models import ModelConfig, build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(corr="truncated", widths=(4, 8, 8), fc_dim=16)).eval()
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        y = net(x)[0].argmax(1)
    torch.manual_seed(1)
    last = PGD(0.05, steps=5)(net, x, y)
    torch.manual_seed(1)
    best = PGD(0.05, steps=5, score_fn=misclassified_first)(net, x, y)
    with torch.no_grad():
        (z_last, c_last), (z_best, c_best) = net(last), net(best)
    assert float((best - x).abs().max()) <= 0.05 + 1e-6
    assert bool(((z_best.argmax(1) != y) | (z_last.argmax(1) == y)).all())
    assert bool((misclassified_first(best, z_best, c_best, y) >= misclassified_first(last, z_last, c_last, y)
                 - 1e-4).all())


def test_the_served_score_orders_accepted_and_wrong_then_wrong_then_correct() -> None:
    from training.evaluation.served import ServedScore
    from training.rule import Rule

    cos = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.95, 0.0]], dtype=torch.float64)  # row 0: class 0 at 25.8 deg
    logits = 10 * cos
    rule = Rule((20.0, 20.0), (10.0, 10.0), 1.0)  # threshold 30 deg: row 0 accepted, row 1 (73 deg) rejected
    y = torch.tensor([1, 0, 0])  # row 0 accepted and wrong, row 1 wrong (rejected), row 2 correct
    score = ServedScore(lambda x: (logits, cos), rule)(torch.zeros(3, 1, 2, 2), logits, cos, y)
    assert score[0] > score[1] > score[2]
