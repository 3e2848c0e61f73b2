"""Rejection training (training/rejection.py), its outliers (training/outliers.py), the
rule-aware guard, and the attacks aimed at the verdict (training/evaluation/rule_attacks.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.verdict import geodesic_verdict
from support.fake_store import build_model, prototype
from training.config import TrainConfig
from training.evaluation.foreign import DistalAttack
from training.evaluation.rule_attacks import RuleAttack, RuleScores, _FlooredTrueClass
from training.guard import GuardConfig
from training.judging import OnnxModel
from training.models import ModelConfig
from training.models import build_model as build_net
from training.outliers import HELD_OUT, KINDS, TRAINED, make_outliers, mixed_trained_outliers
from training.rejection import (
    RejectionConfig,
    ServedCones,
    correct_or_reject_loss,
    reject_loss,
    rule_decision,
    rule_logits,
)
from training.rule import Rule, measure_rule, rule_objective
from training.train import train

CFG = RejectionConfig()


def _random_rule(seed: int, n: int = 400, k: int = 10) -> tuple[np.ndarray, np.ndarray, Rule]:
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.2, 0.98, (n, k))
    logits = 10 * cos + rng.normal(0, 0.3, (n, k))  # label = argmax logits, not always argmax cos
    return logits, cos, Rule(tuple(rng.uniform(20, 60, k)), tuple(rng.uniform(2, 10, k)), float(rng.uniform(0.9, 1.2)))


def test_correct_or_reject_loss_is_minus_log_of_p_true_plus_p_reject() -> None:
    logits, cos, rule = _random_rule(0, n=32)
    lg, cs, thr = torch.tensor(logits), torch.tensor(cos), rule.cos_thresholds().double()
    y = torch.randint(10, (32,), generator=torch.Generator().manual_seed(0))
    p = torch.softmax(rule_logits(lg, cs, CFG, thr), 1)
    want = -torch.log(p[torch.arange(32), y] + p[:, -1])
    torch.testing.assert_close(correct_or_reject_loss(lg, cs, y, CFG, thr), want)
    torch.testing.assert_close(reject_loss(lg, cs, CFG, thr), -torch.log(p[:, -1]))


def test_the_margin_lowers_the_true_class_logit_only() -> None:
    cos = torch.zeros(3, 10)
    y = torch.tensor([0, 4, 9])
    thr = torch.full((10,), 0.5)
    z = rule_logits(cos, cos, CFG, thr, y)
    assert z.shape == (3, 11)
    assert torch.all(z[torch.arange(3), y] == -CFG.scale * CFG.margin)
    assert torch.all(z[:, -1] == CFG.scale * 0.5)
    assert int((z[:, :10] != 0).sum()) == 3


@pytest.mark.parametrize("seed", range(5))
def test_trainings_decision_is_the_served_verdict(seed: int) -> None:
    """Training rejects exactly where app.verdict rejects, with the same label, on random
    logits, cosines and per-class statistics (labels from logits, not always argmax cos)."""
    logits, cos, rule = _random_rule(seed)
    v = geodesic_verdict(logits, cos, rule.angle_mean_deg, rule.angle_std_deg, rule.rho)
    labels, accepted = rule_decision(torch.tensor(logits), torch.tensor(cos), CFG, rule.cos_thresholds().double())
    assert 0 < v.accepted.sum() < len(v)  # both verdicts occur
    assert (logits.argmax(1) != cos.argmax(1)).any()  # and the two argmaxes differ somewhere
    np.testing.assert_array_equal(labels.numpy(), v.labels)
    np.testing.assert_array_equal(accepted.numpy(), v.accepted)


def test_served_cones_are_the_rule_export_would_ship_and_survive_a_checkpoint() -> None:
    torch.manual_seed(0)
    net = build_net(ModelConfig(arch="dsphere", corr="truncated", head="wm", widths=(4, 4, 4), fc_dim=8))
    x, y = torch.rand(60, 1, 28, 28), torch.randint(10, (60,))
    cfg = RejectionConfig(cone_n_stats=30, cone_refresh_every=5)
    cones = ServedCones(cfg, 10, x, y)
    assert cones.due(3)  # never measured
    cones.refresh(net, 3)
    assert not cones.due(4) and cones.due(5)
    want = measure_rule(net, x[:30], y[:30], x[30:60], cfg.target_reject_rate)
    assert cones.rule == want
    torch.testing.assert_close(cones.cos_thr, want.cos_thresholds())
    again = ServedCones(cfg, 10)
    again.load(cones.state())
    assert again.rule == want and again.iteration == 3
    assert not ServedCones(RejectionConfig(cones="fixed"), 10).due(0)


@pytest.mark.parametrize("seed", range(5))
def test_rule_objective_is_positive_exactly_when_the_served_rule_accepts_a_wrong_label(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 400, 10
    cos = rng.uniform(0.2, 0.95, (n, k))
    logits = 10 * cos + rng.normal(0, 0.3, (n, k))  # label = argmax logits, not always argmax cos
    y = rng.integers(0, k, n)
    mean, std, rho = rng.uniform(30, 60, k), rng.uniform(3, 8, k), 1.05
    v = geodesic_verdict(logits, cos, mean, std, rho)
    broken = v.accepted & (v.labels != y)
    rule = Rule(tuple(mean), tuple(std), rho)
    obj = rule_objective(torch.tensor(logits), torch.tensor(cos), torch.tensor(y),
                         rule.cos_thresholds().double(), kappa=10.0)
    assert 0 < broken.sum() < n  # both cases occur
    np.testing.assert_array_equal(obj.numpy() > 0, broken)


def test_every_outlier_kind_is_an_image_batch_in_range() -> None:
    x = torch.rand(16, 1, 28, 28)
    assert set(TRAINED).isdisjoint(HELD_OUT) and len(HELD_OUT) >= 3
    for kind in KINDS:
        out = make_outliers(kind, x, torch.Generator().manual_seed(1))
        again = make_outliers(kind, x, torch.Generator().manual_seed(1))
        assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1, kind
        torch.testing.assert_close(out, again)  # seeded: reproducible tables
    const = make_outliers("constant", x, torch.Generator().manual_seed(0))
    assert torch.all(const.flatten(1).std(1) == 0)
    perm = make_outliers("pixel_permuted", x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(perm.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    shuffled = make_outliers("patch_shuffled", x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(shuffled.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    mixed = mixed_trained_outliers(x, torch.Generator().manual_seed(0))
    assert mixed.shape == x.shape
    with pytest.raises(ValueError, match="unknown outlier kind"):
        make_outliers("cats", x, None)


def test_a_rejection_run_is_guarded_on_the_defended_rate(tmp_path: Path) -> None:
    """A short rejection run on real images: the guard knows the rule (defended rate, rho at
    its target false-reject rate), best/ is the point of highest defended rate, and export
    can take it."""
    torch.set_num_threads(1)
    cfg = TrainConfig(mode="rejection", eps=0.1, iterations=72, natural_epochs=1, limit_train=1500, n_val=600,
                      batch_size=32, checkpoint_every=0, lr=3e-3,
                      guard=GuardConfig(every=8, n_examples=200, n_stats=600))
    _, ckpt = train(ModelConfig(corr="truncated", widths=(4, 8, 8), fc_dim=16), cfg, tmp_path / "run",
                    show_progress=False)
    guard = ckpt.metrics["guard"]
    cones = ckpt.metrics["served_cones"]  # training rejected outside the model's own served cones
    assert cones["iteration"] == 50 and cones["rho"] > 0 and len(cones["angle_mean_deg"]) == 10
    assert [g["iteration"] for g in guard][:4] == [48, 56, 64, 72]  # after the natural epoch (46 iterations)
    for g in guard:
        assert g["defended_rate"] is not None and g["defended_rate"] >= g["pgd_accuracy"] - 1e-9
        assert g["rho"] > 0 and abs(g["clean_reject_rate"] - 0.05) <= 0.05
    best = max(guard, key=lambda g: g["defended_rate"])
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best"]["iteration"] == best["iteration"]
    assert summary["best"]["defended_rate"] == pytest.approx(best["defended_rate"])


@pytest.fixture(scope="module")
def fixture_onnx(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    path.write_bytes(build_model())
    return OnnxModel(path)


def test_rule_scores_argmax_differs_from_the_label_exactly_when_accepted_and_wrong(fixture_onnx: OnnxModel) -> None:
    """The gradient-free rule attack's success test is the served rule."""
    rng = np.random.default_rng(0)
    protos = np.stack([prototype(k) for k in range(10)]).astype(np.float32) / 255
    noise = rng.uniform(-1, 1, (200, 28, 28)).astype(np.float32) * np.repeat([0.1, 0.45, 2.0, 5.0], 50)[:, None, None]
    x = protos[rng.integers(0, 10, 200)] + noise
    x = torch.from_numpy(np.clip(x, 0, 1)[:, None].astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 200))
    rule = Rule((10.0,) * 10, (5.0,) * 10, 1.5)
    floored = _FlooredTrueClass(RuleScores(fixture_onnx, rule, 10), y)
    s = floored(x)
    logits, cos = fixture_onnx(x)
    v = geodesic_verdict(logits, cos, rule.angle_mean_deg, rule.angle_std_deg, rule.rho)
    broken = v.accepted & (v.labels != y.numpy())
    assert 0 < broken.sum() < 200 and (~v.accepted).sum() > 0
    np.testing.assert_array_equal(s.argmax(1).numpy() != y.numpy(), broken)
    # a perturbed row is matched to its clean row's label
    torch.testing.assert_close(floored(x[:5] + 0.01), floored.scores(x[:5] + 0.01).scatter(
        1, y[:5].view(-1, 1), torch.maximum(floored.scores(x[:5] + 0.01).gather(1, y[:5].view(-1, 1)),
                                            torch.full((5, 1), RuleScores.FLOOR))))


def test_rule_attack_and_distal_attack_stay_in_the_ball_and_beat_the_rule_with_no_threshold() -> None:
    """With rho huge (nothing is rejected), the rule attack is an untargeted attack that must
    fool an untrained-for-robustness net on most inputs; the distal attack must get noise
    accepted at a generous rho. Both stay in the eps-ball."""
    torch.manual_seed(0)
    net = build_net(ModelConfig(corr="truncated", widths=(4, 8, 8), fc_dim=16)).eval()
    x = torch.rand(24, 1, 28, 28)
    with torch.no_grad():
        y = net(x)[0].argmax(1)  # the net is "correct" on its own labels
    easy = Rule((89.0,) * 10, (0.5,) * 10, 10.0)
    x_adv = RuleAttack(0.3, easy, steps=10)(net, x, y)
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        logits, cos = net(x_adv)
    assert easy.broken(logits, cos, y).mean() >= 0.5
    start = torch.full((8, 1, 28, 28), 0.5)
    d = DistalAttack(0.1, easy, steps=5)(net, start)
    assert float((d - start).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        lg, cs = net(d)
    v = geodesic_verdict(lg.double().numpy(), cs.double().numpy(), easy.angle_mean_deg, easy.angle_std_deg, easy.rho)
    assert v.accepted.all()


def test_a_run_stopped_for_good_is_sealed_and_kept(tmp_path: Path) -> None:
    """keep --stopped: best/ of a run stopped before its end gets what the end would have given it."""
    from training.checkpoint import CheckpointError, keep_checkpoint, load_checkpoint
    from training.train import seal_stopped_run

    torch.set_num_threads(1)
    cfg = TrainConfig(mode="rejection", eps=0.1, iterations=200, natural_epochs=1, limit_train=1500, n_val=600,
                      batch_size=32, checkpoint_every=0, lr=3e-3,
                      guard=GuardConfig(every=8, n_examples=200, n_stats=600))
    train(ModelConfig(corr="truncated", widths=(4, 8, 8), fc_dim=16), cfg, tmp_path / "run", show_progress=False,
          stop_after=64)
    with pytest.raises(CheckpointError, match="not a finished"):
        keep_checkpoint(tmp_path / "run", tmp_path / "kept")
    seal_stopped_run(tmp_path / "run", "stopped by hand in a test")
    kept = keep_checkpoint(tmp_path / "run", tmp_path / "kept")
    _, ckpt = load_checkpoint(kept)
    assert ckpt.angle_stats is not None and ckpt.learned is not None
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped"] == "stopped by hand in a test"
    assert summary["best"]["iteration"] == ckpt.iteration
