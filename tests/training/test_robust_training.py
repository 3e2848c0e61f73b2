"""N-FGSM, TRADES and the catastrophic-overfitting guard: the adversarial inputs' ranges
and radii, each loss on a tiny net against a hand computation, the guard's stop rule,
best/ for export, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.training.conftest import TINY
from training.adversarial import adversarial_input, training_loss
from training.attacks import NFGSM, TradesPGD, kl_clean_adv
from training.checkpoint import checkpoint_dir, keep_checkpoint, load_checkpoint
from training.config import TrainConfig
from training.guard import CatastrophicOverfitting, GuardConfig, GuardPoint, OverfittingGuard
from training.models import ModelConfig, build_model
from training.objectives import ObjectiveConfig
from training.train import train

EPS = 0.1


class Linear(nn.Module):
    """A tiny linear classifier on 1x2x2 images, returning (logits, logits) like ConvNet."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.fc(x.flatten(1))
        return z, z


def batch(n: int = 64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 2, 2, generator=g)
    x[: n // 4] = 0.0  # pixels at the box's edges, where clipping matters
    x[n // 4: n // 2] = 1.0
    return x, torch.randint(0, 3, (n,), generator=g)


def test_nfgsm_leaves_the_eps_ball_but_not_the_unit_box() -> None:
    model, (x, y) = Linear(), batch()
    x_adv = NFGSM(EPS)(model, x, y)
    dist = (x_adv - x).abs().amax(dim=(1, 2, 3))
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(dist.max()) <= 3 * EPS + 1e-6  # noise 2ε + step ε, never projected
    assert float(dist.max()) > EPS + 1e-3  # no projection back to the ε-ball


def test_nfgsm_is_noise_plus_one_signed_gradient_step() -> None:
    model, (x, y) = Linear(), batch()
    torch.manual_seed(7)
    x_adv = NFGSM(EPS)(model, x, y)
    torch.manual_seed(7)
    x0 = (x + torch.empty_like(x).uniform_(-2 * EPS, 2 * EPS)).clamp(0, 1)
    # ∂CE/∂x for a linear model: Wᵀ(softmax(Wx + b) - onehot(y))
    p = F.softmax(model.fc(x0.flatten(1)), 1)
    grad = ((p - F.one_hot(y, 3).float()) @ model.fc.weight).view_as(x)
    torch.testing.assert_close(x_adv, (x0 + EPS * grad.sign()).clamp(0, 1))


def test_trades_attack_stays_in_eps_ball_and_raises_the_kl() -> None:
    model, (x, _) = Linear(), batch()
    x_adv = TradesPGD(EPS, steps=5)(model, x)
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    with torch.no_grad():
        kl = kl_clean_adv(model(x)[0], model(x_adv)[0])
    assert float(kl.mean()) > 1e-4


def test_kl_clean_adv_is_the_kl_divergence() -> None:
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    p, q = F.softmax(a, 1), F.softmax(b, 1)
    torch.testing.assert_close(kl_clean_adv(a, b), (p * (p.log() - q.log())).sum(1))


def tiny_dsphere() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY, head="softmax", input_shape=(1, 8, 8), num_classes=3))


@pytest.mark.parametrize("mode", ["nfgsm", "trades", "pgd", "fgsm"])
def test_adversarial_input_range(mode: str) -> None:
    model, x, y = tiny_dsphere(), torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    x_adv = adversarial_input(model, x, y, mode, EPS, steps=3, step_size=None)
    radius = 3 * EPS if mode == "nfgsm" else EPS
    assert float((x_adv - x).abs().max()) <= radius + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_nfgsm_loss_is_all_on_the_adversarial_input() -> None:
    model, x, y = tiny_dsphere(), torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    x_adv = torch.rand_like(x)
    loss, logits = training_loss(model, model, x, x_adv, y, "nfgsm", adv_weight=1.0, trades_beta=6.0, iteration=0,
                                 objective=ObjectiveConfig())
    model.train()
    expected = F.cross_entropy(model(x_adv)[0], y)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, model(x_adv)[0])


def test_trades_loss_is_clean_ce_plus_beta_kl() -> None:
    model, x, y = tiny_dsphere(), torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    x_adv = (x + 0.05).clamp(0, 1)
    loss, _ = training_loss(model, model, x, x_adv, y, "trades", adv_weight=1.0, trades_beta=6.0, iteration=0,
                            objective=ObjectiveConfig())
    model.train()
    clean, adv = model(x)[0], model(x_adv)[0]
    p, q = F.softmax(clean, 1), F.softmax(adv, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(loss, F.cross_entropy(clean, y) + 6.0 * kl)


def test_nfgsm_refuses_a_clean_loss_share() -> None:
    with pytest.raises(ValueError, match="nfgsm"):
        TrainConfig(mode="nfgsm", adv_weight=0.5)


def point(it: int, acc: float) -> GuardPoint:
    return GuardPoint(iteration=it, epoch=0, pgd_accuracy=acc, clean_accuracy=0.8)


def test_guard_stops_only_past_the_allowed_drop() -> None:
    guard = OverfittingGuard(GuardConfig(max_drop=0.2), torch.zeros(1, 1, 2, 2), torch.zeros(1), EPS)
    guard.history = [point(500, 0.40), point(1000, 0.60)]
    assert guard.collapse_reason(point(1500, 0.41)) is None
    guard.history.append(point(1500, 0.39))
    reason = guard.collapse_reason(guard.history[-1])
    assert reason is not None and "catastrophic overfitting" in reason and "0.600" in reason
    assert guard.best == point(1000, 0.60)


def test_guard_measure_is_repeatable_and_leaves_the_rng_alone() -> None:
    model, x, y = tiny_dsphere(), torch.rand(20, 1, 8, 8), torch.randint(0, 3, (20,))
    guard = OverfittingGuard(GuardConfig(n_examples=20), x, y, EPS)
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    a = guard.measure(model, 1, 0)
    b = guard.measure(model, 2, 0)
    assert torch.rand(1) == before
    assert a.pgd_accuracy == b.pgd_accuracy and a.pgd_accuracy <= a.clean_accuracy


SMALL = dict(mode="nfgsm", epochs=2, limit_train=256, n_val=300, batch_size=32, lr=3e-3, natural_epochs=0.5,
             eps_warmup_epochs=0.5, checkpoint_every=0, guard=GuardConfig(every=3, n_examples=100),
             min_accuracy_over_chance=-1.0)  # these runs test the mechanics, not learning


def small_run(out: Path, stop_after: int | None = None, resume: bool = False, init_from: str | None = None,
              **over: object):
    torch.set_num_threads(1)
    cfg = TrainConfig(**{**SMALL, **over})  # type: ignore[arg-type]
    return train(ModelConfig(**TINY), cfg, out, resume=resume, show_progress=False, stop_after=stop_after,
                 init_from=init_from)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    small_run(out)
    return out


def test_adversarial_run_keeps_best_and_logs_the_guard(uninterrupted: Path) -> None:
    summary = json.loads((uninterrupted / "summary.json").read_text())
    guard = summary["guard"]
    assert len(guard) >= 4 and all(0 <= g["pgd_accuracy"] <= 1 for g in guard)
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1]
    assert all("val_pgd_accuracy" in e for e in summary["epochs"])
    best = max(guard, key=lambda g: g["pgd_accuracy"])
    assert summary["best"]["iteration"] == best["iteration"] and summary["stopped"] is None
    _, ckpt = load_checkpoint(uninterrupted)  # a run directory: export and evaluate take best/
    assert checkpoint_dir(uninterrupted) == uninterrupted / "best"
    assert ckpt.iteration == best["iteration"] and ckpt.learned is not None and ckpt.angle_stats is not None


def test_resumed_run_equals_uninterrupted_run(uninterrupted: Path, tmp_path: Path) -> None:
    small_run(tmp_path, stop_after=7)  # an interruption mid-epoch, between guard checks
    assert not (tmp_path / "final").exists()
    assert load_checkpoint(tmp_path / "last")[1].iteration == 7
    small_run(tmp_path, resume=True)
    whole = json.loads((uninterrupted / "summary.json").read_text())
    resumed = json.loads((tmp_path / "summary.json").read_text())
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    assert resumed["guard"] == whole["guard"]
    assert resumed["best"]["iteration"] == whole["best"]["iteration"]


def test_resumed_rejection_run_keeps_its_served_cones(tmp_path: Path) -> None:
    """Rejection training's cones are measured every few iterations: a run interrupted between
    two measurements resumes with the cones it had (not ones measured on its later weights)."""
    from training.rejection import RejectionConfig

    over = dict(mode="rejection", rejection=RejectionConfig(cone_refresh_every=5, cone_n_stats=64))
    small_run(tmp_path / "whole", **over)
    small_run(tmp_path / "parts", stop_after=7, **over)
    assert load_checkpoint(tmp_path / "parts" / "last")[1].metrics["served_cones"]["iteration"] == 5
    small_run(tmp_path / "parts", resume=True, **over)
    whole, resumed = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "parts"))
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    assert resumed["served_cones"] == whole["served_cones"]


def test_resume_needs_no_init_checkpoint(tmp_path: Path) -> None:
    """A resumed run's weights come from last/: the warm start it began from may be gone."""
    from training.distributed import weights_digest

    small_run(tmp_path / "a", stop_after=4)
    small_run(tmp_path / "a", resume=True, init_from=str(tmp_path / "gone"), stop_after=6)
    small_run(tmp_path / "b", stop_after=6)  # the same 6 iterations without the interruption
    resumed, straight = load_checkpoint(tmp_path / "a" / "last"), load_checkpoint(tmp_path / "b" / "last")
    assert resumed[1].iteration == straight[1].iteration == 6
    assert weights_digest(resumed[0]) == weights_digest(straight[0])  # continued from last/, not from scratch


def test_resume_refuses_other_options(uninterrupted: Path, tmp_path: Path) -> None:
    small_run(tmp_path, stop_after=4)
    with pytest.raises(ValueError, match="other training options"):
        small_run(tmp_path, resume=True, lr=1e-2)


def test_collapse_stops_the_run_and_keeps_best(tmp_path: Path) -> None:
    # a guard that allows no drop at all stops at the first check below the best
    with pytest.raises(CatastrophicOverfitting) as e:
        small_run(tmp_path, guard=GuardConfig(every=1, n_examples=100, max_drop=-1.0))
    assert "catastrophic overfitting" in str(e.value)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == str(e.value)
    assert not (tmp_path / "final").exists() and (tmp_path / "best").is_dir()
    assert load_checkpoint(tmp_path)[1].learned is not None


def test_keep_copies_the_chosen_checkpoint_small(uninterrupted: Path, tmp_path: Path) -> None:
    kept = keep_checkpoint(uninterrupted, tmp_path / "kept")
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoint.json", "model.safetensors", "summary.json"]
    a, ca = load_checkpoint(kept)
    b, cb = load_checkpoint(uninterrupted / "best")
    assert ca.iteration == cb.iteration and ca.angle_stats == cb.angle_stats
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)
