"""Invariants of `python -m training evaluate` on a tiny D-SphereNet trained on ~2,000 real
Fashion-MNIST images and exported with training.export.export_version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from app.manifest import Manifest
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.evaluation.attacks import AttackOutOfBall, check_ball
from training.evaluation.cache import SECONDS, AttackCache
from training.evaluation.config import EvalConfig, EvaluationError
from training.evaluation.core import evaluate
from training.evaluation.detectors import Mahalanobis
from training.evaluation.markdown import render_report_markdown
from training.evaluation.schema import Report
from training.evaluation.scoring import Judged, roc_auc, worst_case
from training.export import ExportError, export_version
from training.models import ModelConfig
from training.train import TrainingDidNotLearn, train

ROOT = Path(__file__).resolve().parents[2]
EPS = 0.1
TINY = dict(widths=(4, 8, 8), fc_dim=16)
# tiny budgets: the invariants, not the numbers, are under test
FAST = dict(n_examples=60, pgd_steps=10, pgd_restarts=2, apgd_iter=10, n_apgd=40, square_queries=40, n_square=24,
            transfer_steps=10, n_transfer=60, adaptive_steps=15, n_adaptive=60, n_budget_check=24,
            sweep_eps=(0.0, 0.1, 0.5), sweep_steps=5, n_sweep=30, batch_size=64, rule_steps=8, rule_max_restarts=2,
            n_rule=40, rule_square_queries=30, n_rule_square=24, orthogonal_steps=10, n_orthogonal=40, n_ood=60,
            n_distal=10, distal_steps=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny exported D-SphereNet (version dir + checkpoint) and a tiny baseline substitute."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    tc = TrainConfig(iterations=120, limit_train=2000, n_val=500, checkpoint_every=0, batch_size=64, lr=3e-3)
    train(ModelConfig(**TINY), tc, root / "dsphere", show_progress=False)
    vdir = export_version(root / "dsphere" / "final", root / "store", "tiny", "v1", n_test=200, n_attack=20,
                          pgd_steps=2)
    try:
        train(ModelConfig(arch="baseline", head="softmax", **TINY),
              TrainConfig(iterations=40, limit_train=2000, n_val=500, checkpoint_every=0, batch_size=64, lr=1e-3,
                          seed=1), root / "baseline", show_progress=False)
    except TrainingDidNotLearn:
        pass  # a weak substitute is still a substitute
    return {"root": root, "version": vdir, "checkpoint": root / "dsphere" / "final",
            "substitute": root / "baseline" / "final"}


@pytest.fixture(scope="module")
def full(tiny: dict[str, Path]):  # type: ignore[no-untyped-def]
    cfg = EvalConfig(eps=EPS, substitutes=(str(tiny["substitute"]),), **FAST)  # type: ignore[arg-type]
    return evaluate(tiny["version"], tiny["checkpoint"], cfg, tiny["root"] / "report")


def test_every_attack_ran_inside_the_eps_ball(full) -> None:  # type: ignore[no-untyped-def]
    r: Report = full.report
    names = {a.name for a in r.attacks}
    assert {"fgsm", "pgd-10", "apgd-ce", "apgd-dlr", "square", "adaptive", "rule", "rule-square", "orthogonal"} <= names
    assert any(n.startswith("transfer:") for n in names)
    for a in r.attacks:
        assert a.status == "ok", a
        assert a.max_perturbation is not None and a.max_perturbation <= EPS + 1e-6, a.name
        assert a.n_examples > 0


def _as_reported(value: object) -> object:
    return list(value) if isinstance(value, tuple) else getattr(value, "__name__", value)


def test_every_reported_budget_is_that_of_the_attack_object_that_ran(full) -> None:  # type: ignore[no-untyped-def]
    """No budget is typed twice: each attack's report parameters are the fields of the object
    that made its inputs, and those are the configuration's."""
    import dataclasses

    from training.rule import Rule

    r: Report = full.report
    ran = {a.name: full.ran[a.name] for a in r.attacks if a.status == "ok"}
    assert set(ran) == {a.name for a in r.attacks}
    for name, attack in ran.items():
        params = r.attack(name).params
        inner = getattr(attack, "inner", None)
        for obj in (attack, inner) if dataclasses.is_dataclass(inner) else (attack,):
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if not f.repr:
                    continue
                if isinstance(value, Rule):
                    assert value == Rule.of(r) and params["rho"] == r.rho, name
                elif dataclasses.is_dataclass(value):
                    continue
                elif f.name == "restarts" and "restart_schedule" in params:  # one run a restart, doubled
                    assert value == 1 and params["restarts"] == params["restart_schedule"][-1]["restarts"], name
                elif f.name == "step_size" and value is None:
                    assert params["step_size"] == obj.step, name
                else:
                    assert params[f.name] == _as_reported(value), (name, f.name)
        assert params["eps"] == r.eps, name
    cfg = EvalConfig(eps=EPS, **FAST)  # type: ignore[arg-type]
    assert ran["pgd-10"].steps == cfg.pgd_steps and ran["pgd-10"].step_size == cfg.pgd_step_size
    assert ran["square"].max_iter == cfg.square_queries and ran["rule-square"].max_iter == cfg.rule_square_queries
    assert params_of(r, "apgd-ce")["max_iter"] == cfg.apgd_iter and params_of(r, "orthogonal")["steps"] == 10
    assert params_of(r, "adaptive")["steps"] == cfg.adaptive_steps and params_of(r, "rule")["steps"] == cfg.rule_steps
    budget = r.sanity.pgd_budget
    assert budget is not None
    assert (budget.base["steps"], budget.base["restarts"]) == (cfg.pgd_steps, cfg.pgd_restarts)
    assert (budget.doubled["steps"], budget.doubled["restarts"]) == (2 * cfg.pgd_steps, 2 * cfg.pgd_restarts)
    assert r.sanity.eps_sweep is not None and r.sanity.eps_sweep.attack["steps"] == cfg.sweep_steps
    assert all(d.params["steps"] == cfg.distal_steps and d.params["eps"] == d.eps for d in r.distal)


def test_every_run_at_the_threat_models_eps_counts_in_the_worst_case(full) -> None:  # type: ignore[no-untyped-def]
    """The sweep's runs at eps, both budget checks' runs and the attacks on the other scores are in
    the worst case per example, each on the examples it ran on (so the common prefix is the attacks')."""
    r: Report = full.report
    names = set(r.worst_case.attacks)
    assert {"clean", "eps=0.1", "rule eps=0.1", "pgd (budget check)", "pgd-20 x4 (budget check)", "adaptive-msp",
            "adaptive-mahalanobis"} <= names, names
    assert any(n.startswith("rule x") and n.endswith("(budget check)") for n in names), names
    assert r.worst_case.n_examples == min([a.n_examples for a in r.attacks] + [r.n_examples])
    checks, rule = r.sanity.rule, r.attack("rule")
    assert checks is not None and checks.doubled is not None and checks.n_doubled == 24
    assert checks.doubled["steps"] == 2 * rule.params["steps"]
    assert checks.doubled["restarts"] == 2 * rule.params["restarts"]
    assert checks.doubled_ok == (checks.doubled_defended_rate >= checks.base_defended_rate - checks.doubled_tolerance)
    for name in ("pgd-10", "rule", "orthogonal", "adaptive"):  # white-box iterates kept by model.onnx's verdicts
        assert r.attack(name).params["iterates_judged_by"].startswith("model.onnx"), name
    assert all(d.params["iterates_judged_by"].startswith("model.onnx") for d in r.distal)


def params_of(r: Report, name: str) -> dict[str, object]:
    return r.attack(name).params


def test_check_ball_rejects_out_of_ball_and_out_of_box() -> None:
    x = torch.full((2, 1, 4, 4), 0.5)
    assert check_ball(x + 0.1, x, 0.1) == pytest.approx(0.1)
    with pytest.raises(AttackOutOfBall):
        check_ball(x + 0.2, x, 0.1)
    with pytest.raises(AttackOutOfBall):
        check_ball(torch.zeros_like(x) - 0.05, torch.zeros_like(x), 0.1)


def test_rates_are_consistent(full) -> None:  # type: ignore[no-untyped-def]
    r: Report = full.report
    clean = full.clean
    assert r.clean_accuracy > 0.3  # the tiny model learned something
    for a in r.attacks:
        clean_acc = float(clean.correct[: a.n_examples].mean())
        # strong white-box attacks keep the best (misclassifying) run: never above clean
        slack = 0.0 if a.kind in ("white-box", "adaptive") and a.name != "fgsm" else 0.1
        assert a.robust_accuracy <= clean_acc + slack + 1e-9, a.name
        assert a.defended_rate >= a.robust_accuracy - 1e-9, a.name
        assert a.defended_rate >= a.reject_rate - 1e-9, a.name
        assert a.success_rate == pytest.approx(1 - a.defended_rate)
    wc = r.worst_case
    assert wc.robust_accuracy <= min(a.robust_accuracy for a in r.attacks) + 1e-9 or wc.n_examples < r.n_examples
    assert wc.defended_rate >= wc.robust_accuracy - 1e-9
    for a in r.attacks:  # the worst case is no better than any attack on the common examples
        j = full.judged[a.name]
        assert wc.defended_rate <= float((~j.broken[: wc.n_examples]).mean()) + 1e-9


def test_sanity_checks_and_detectors_present(full) -> None:  # type: ignore[no-untyped-def]
    s = full.report.sanity
    assert s.pgd_budget is not None and s.eps_sweep is not None and s.gradient_free is not None
    assert [p.eps for p in s.eps_sweep.points] == [0.0, 0.1, 0.5]
    assert s.eps_sweep.points[0].robust_accuracy >= s.eps_sweep.points[-1].robust_accuracy
    assert s.eps_sweep.points[-1].robust_accuracy <= 0.1  # eps 0.5 breaks any honest model
    attacks = {d.attack for d in full.report.detectors}
    assert "misclassification (clean)" in attacks
    assert attacks - {"misclassification (clean)"} <= {"pgd-10", "apgd-ce", "adaptive", "rule",
                                                        "adaptive on max softmax probability",
                                                        "adaptive on Mahalanobis distance"}
    noise = s.noise
    assert noise is not None and noise.n_uniform == 1000 and noise.n_constant == 11
    assert 0 <= noise.uniform_reject_rate <= 1 and noise.ok == (min(noise.uniform_reject_rate,
                                                                    noise.constant_reject_rate) >= 0.99)
    for d in full.report.detectors:
        assert 0 <= d.auc <= 1


def test_pgd_restarts_doubled_until_converged(full) -> None:  # type: ignore[no-untyped-def]
    pgd = full.report.attack("pgd-10")
    schedule = pgd.params["restart_schedule"]
    assert [s["restarts"] for s in schedule][:2] == [2, 4]  # 2, then doubled to 4, ...
    accs = [s["robust_accuracy"] for s in schedule]
    assert all(b <= a + 1e-12 for a, b in zip(accs, accs[1:], strict=False))  # each example keeps its worst
    assert pgd.params["restarts"] == schedule[-1]["restarts"] and pgd.robust_accuracy == accs[-1]
    if pgd.params["converged"]:
        assert accs[-2] - accs[-1] <= pgd.params["restart_tolerance"]
    else:
        assert 2 * schedule[-1]["restarts"] > EvalConfig().pgd_max_restarts


def test_three_rejection_scores_side_by_side(full) -> None:  # type: ignore[no-untyped-def]
    for d in full.report.detectors:
        scores = {s.score: s for s in d.scores}
        assert set(scores) == {"angle ratio (geodesic rule)", "max softmax probability", "Mahalanobis distance"}
        assert scores["angle ratio (geodesic rule)"].threshold == full.report.rho
        assert scores["angle ratio (geodesic rule)"].auroc == pytest.approx(d.auc)
        for name in ("max softmax probability", "Mahalanobis distance"):  # 5 % of 500 validation images
            assert abs(scores[name].validation_reject - 0.05) <= 0.01, name
        for s in d.scores:
            assert 0 <= s.auroc <= 1 and 0 <= s.adversarial_catch <= 1
    assert "two standard rejection scores" in render_report_markdown(full.report)


def test_mahalanobis_distance_is_the_closest_class_in_the_shared_metric() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 3)) + np.repeat(np.eye(3) * 4, 100, axis=0)
    labels = np.repeat(np.arange(3), 100)
    m = Mahalanobis.fit(f, labels, 3)
    cov = np.cov((f - m.means[labels]).T, bias=True)
    q = rng.normal(size=(5, 3))
    brute = [min(float((v - mu) @ np.linalg.inv(cov) @ (v - mu)) for mu in m.means) for v in q]
    np.testing.assert_allclose(m.distance(q), brute, rtol=1e-8)


def test_interrupted_evaluation_resumes_from_its_cache(full, tiny) -> None:  # type: ignore[no-untyped-def]
    cache = tiny["root"] / "report" / ".cache"
    assert any(cache.glob("pgd-10-*.safetensors")) and any(cache.glob("adaptive-*.safetensors"))
    again_dir = tiny["root"] / "report-again"  # a second run into a folder holding the first one's cache
    shutil.copytree(cache, again_dir / ".cache", dirs_exist_ok=True)
    cfg = EvalConfig(eps=EPS, attacks=("fgsm", "pgd", "adaptive"), sanity=False, figures=False, detectors=False,
                     **FAST)  # type: ignore[arg-type]
    again = evaluate(tiny["version"], tiny["checkpoint"], cfg, again_dir).report
    for name in ("fgsm", "pgd-10", "adaptive"):
        assert again.attack(name).robust_accuracy == full.report.attack(name).robust_accuracy
        assert again.attack(name).defended_rate == full.report.attack(name).defended_rate
    # what the runs read back cost when they were crafted (every restart's file), not the read
    store = AttackCache(again_dir / ".cache")
    crafted = 0.0
    for path in store.files()["pgd-10"]:
        with safe_open(str(path), framework="pt") as f:
            crafted += float(f.metadata()[SECONDS])
    assert crafted > 0 and again.attack("pgd-10").seconds >= round(crafted, 1) - 0.1


def test_a_rho_override_crafts_its_own_runs_and_the_manifests_rho_reads_them_back(full, tiny) -> None:  # type: ignore[no-untyped-def]
    """PGD ignores the rule but keeps its best iterate by the rule's verdicts: at another ρ its inputs are
    another run, never the manifest ρ's read back from the cache; given the manifest's own ρ, they are."""
    first = full.report
    for rho, expect_new in ((first.rho, False), (first.rho * 0.9, True)):
        out = tiny["root"] / f"report-rho-{rho:.6f}"
        shutil.copytree(tiny["root"] / "report" / ".cache", out / ".cache")
        before = {p.name for p in (out / ".cache").glob("pgd-10-*.safetensors")}
        cfg = EvalConfig(eps=EPS, attacks=("pgd",), rho=rho, sanity=False, figures=False, detectors=False,
                         **FAST)  # type: ignore[arg-type]
        again = evaluate(tiny["version"], tiny["checkpoint"], cfg, out).report
        after = {p.name for p in (out / ".cache").glob("pgd-10-*.safetensors")}
        assert again.rho == rho
        assert (after != before) is expect_new and before <= after
        if not expect_new:
            assert again.attack("pgd-10").defended_rate == first.attack("pgd-10").defended_rate


def test_an_interrupted_evaluation_resumes_its_checks_too(full, tiny) -> None:  # type: ignore[no-untyped-def]
    """The budget checks' runs, the ε sweep and the distal attack are kept (in .cache/checks/, apart from
    the attacks' files that reports list and precision records read) and read back by a second run: the
    same outcomes, not one file written again."""
    checks = tiny["root"] / "report" / ".cache" / "checks"
    stems = {p.name.rsplit("-", 1)[0] for p in checks.glob("*.safetensors")}
    assert {"pgd-budget", "pgd-budget-doubled", "pgd-sweep", "rule-sweep", "rule-budget-doubled",
            "distal-uniform_noise", "distal-constant"} <= stems, stems
    attack_files = checks.parent.glob("*.safetensors")
    assert not any(p.name.startswith(("pgd-budget", "pgd-sweep", "distal")) for p in attack_files)
    written = {p.name: p.stat().st_mtime_ns for p in checks.iterdir()}
    again_dir = tiny["root"] / "report-checks-again"
    shutil.copytree(tiny["root"] / "report" / ".cache", again_dir / ".cache")
    for p in (again_dir / ".cache" / "checks").iterdir():
        os.utime(p, ns=(written[p.name], written[p.name]))
    cfg = EvalConfig(eps=EPS, attacks=("pgd", "rule"), figures=False, detectors=False, **FAST)  # type: ignore[arg-type]
    again = evaluate(tiny["version"], tiny["checkpoint"], cfg, again_dir).report
    assert {p.name: p.stat().st_mtime_ns for p in (again_dir / ".cache" / "checks").iterdir()} == written
    first = full.report
    assert again.sanity.pgd_budget == first.sanity.pgd_budget
    assert again.sanity.eps_sweep == first.sanity.eps_sweep
    assert again.sanity.rule.doubled_defended_rate == first.sanity.rule.doubled_defended_rate
    assert again.distal == first.distal


def test_export_takes_its_figures_from_the_evaluation(full, tiny) -> None:  # type: ignore[no-untyped-def]
    report = tiny["root"] / "report" / "report.json"
    vdir = export_version(tiny["checkpoint"], tiny["root"] / "published", "tiny", "v1", n_test=200,
                          evaluation=report)
    m = Manifest.model_validate_json((vdir / "manifest.json").read_text()).metrics
    r, pgd = full.report, full.report.attack("pgd-10")
    assert (vdir / "model.onnx").read_bytes() == (tiny["version"] / "model.onnx").read_bytes()
    assert (m.pgd_robust_accuracy, m.pgd_defended_rate) == (pgd.robust_accuracy, pgd.defended_rate)
    assert m.pgd_attack.restarts == pgd.params["restarts"] and m.pgd_attack.n_examples == pgd.n_examples
    assert m.worst_case_defended_rate == r.worst_case.defended_rate
    assert m.worst_case_robust_accuracy == r.worst_case.robust_accuracy
    assert m.adaptive_defended_rate == r.attack("adaptive").defended_rate
    assert m.worst_case_attacks is not None
    assert "adaptive" in m.worst_case_attacks and "clean" not in m.worst_case_attacks
    assert m.worst_case_n_examples == r.worst_case.n_examples


def test_export_refuses_an_evaluation_of_another_model(full, tiny) -> None:  # type: ignore[no-untyped-def]
    report = tiny["root"] / "report" / "report.json"
    model, ckpt = load_checkpoint(tiny["checkpoint"])
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)  # another model: another model.onnx
    other = save_checkpoint(tiny["root"] / "nudged", model, ckpt)
    with pytest.raises(ExportError, match="sha256"):
        export_version(other, tiny["root"] / "other", "tiny", "v1", n_test=200, evaluation=report)
    with pytest.raises(ExportError, match="eps"):
        export_version(tiny["checkpoint"], tiny["root"] / "other", "tiny", "v2", n_test=200, eps=0.2,
                       evaluation=report)


def test_comparison_puts_reports_side_by_side(full, tiny) -> None:  # type: ignore[no-untyped-def]
    out = tiny["root"] / "cmp.md"
    report = tiny["root"] / "report" / "report.json"
    r = _cli("compare", str(report), str(report), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    wc = next(line for line in rows if "worst case per example: defended" in line)
    assert wc.count(f"{100 * full.report.worst_case.defended_rate:.1f} %") == 2
    assert any("Mahalanobis distance: AUROC" in line for line in rows)
    assert any(line.startswith("| ε sweep 0.5:") for line in rows)
    bad = _cli("compare", str(tiny["root"] / "nope.json"), "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot read" in bad.stderr


def test_outputs_written_and_schema_round_trips(full, tiny) -> None:  # type: ignore[no-untyped-def]
    out = tiny["root"] / "report"
    for f in ("report.json", "report.md", "angle_hist.png", "roc.png", "eps_sweep.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    text = (out / "report.json").read_text()
    r = Report.model_validate_json(text)
    assert Report.model_validate_json(r.model_dump_json()) == r
    d = json.loads(text)
    for key in ("model", "eps", "n_examples", "rho", "clean_accuracy", "clean_reject_rate", "attacks", "worst_case"):
        assert key in d
    assert set(d["model"]) >= {"name", "version", "sha256"}
    for a in d["attacks"]:
        assert {"name", "robust_accuracy", "reject_rate", "defended_rate"} <= set(a)
    assert "Worst case" in (out / "report.md").read_text()


def test_reject_everything_defends_everything(tiny) -> None:
    cfg = EvalConfig(eps=EPS, rho=1e-6, attacks=("fgsm", "pgd"), sanity=False, figures=False,
                     **{**FAST, "pgd_steps": 3})  # type: ignore[arg-type]
    r = evaluate(tiny["version"], tiny["checkpoint"], cfg).report
    assert r.clean_reject_rate == 1.0
    assert r.clean_defended_rate == 1.0
    for a in r.attacks:
        assert a.reject_rate == 1.0 and a.defended_rate == 1.0
    assert r.worst_case.defended_rate == 1.0


def test_adaptive_breaks_an_undefended_model_at_least_as_often_as_pgd(tiny) -> None:
    cfg = EvalConfig(eps=EPS, rho=1e6, attacks=("pgd", "adaptive"), sanity=False, figures=False,
                     **{**FAST, "pgd_steps": 20, "pgd_restarts": 1, "adaptive_steps": 20})  # type: ignore[arg-type]
    r = evaluate(tiny["version"], tiny["checkpoint"], cfg).report
    pgd, adaptive = r.attack("pgd-20"), r.attack("adaptive")
    assert pgd.reject_rate == 0.0 and adaptive.reject_rate == 0.0  # threshold disabled
    assert adaptive.success_rate >= pgd.success_rate


def test_validation_split_attacks_the_held_out_images_and_never_reaches_a_manifest(tiny) -> None:
    from training.data import training_splits
    from training.judging import OnnxModel

    out = tiny["root"] / "validation"
    cfg = EvalConfig(eps=EPS, split="validation", attacks=("fgsm",), sanity=False, figures=False,
                     detectors=False, **FAST)  # type: ignore[arg-type]
    r = evaluate(tiny["version"], tiny["checkpoint"], cfg, out).report
    _, val = training_splits("fashion-mnist", None, 500)
    logits, _ = OnnxModel(tiny["version"] / "model.onnx")(val.images[:r.n_examples])
    assert r.split == "validation" and "60 validation examples" in render_report_markdown(r)
    assert r.clean_accuracy == pytest.approx(float((logits.argmax(1) == val.labels[:r.n_examples].numpy()).mean()))
    with pytest.raises(ExportError, match="validation split"):
        export_version(tiny["checkpoint"], tiny["root"] / "from-validation", "tiny", "v1", n_test=200,
                       evaluation=out / "report.json")
    test_cfg = EvalConfig(eps=EPS, attacks=("fgsm",), sanity=False, figures=False, detectors=False,
                          **FAST)  # type: ignore[arg-type]
    evaluate(tiny["version"], tiny["checkpoint"], test_cfg, out)
    assert len(list((out / ".cache").glob("fgsm-*.safetensors"))) == 2  # the same attack, two splits, two entries


def test_transfer_without_substitutes_is_listed_as_skipped(tiny) -> None:
    cfg = EvalConfig(eps=EPS, attacks=("transfer",), sanity=False, figures=False, **FAST)  # type: ignore[arg-type]
    r = evaluate(tiny["version"], None, cfg).report
    (t,) = r.attacks
    assert t.status == "skipped" and "substitute" in (t.reason or "")


def test_without_checkpoint_white_box_is_skipped_with_reason(tiny) -> None:
    cfg = EvalConfig(eps=EPS, attacks=("fgsm", "adaptive"), sanity=False, figures=False, weights_from_onnx=False,
                     **FAST)  # type: ignore[arg-type]
    r = evaluate(tiny["version"], None, cfg).report
    assert r.model.white_box_weights is None
    assert all(a.status == "skipped" and "checkpoint" in (a.reason or "") for a in r.attacks)


def test_without_checkpoint_weights_are_rebuilt_from_onnx(tiny) -> None:
    """The version alone suffices: same attack, same inputs, same result as with its checkpoint."""
    cfg = EvalConfig(eps=EPS, attacks=("fgsm",), sanity=False, figures=False, **FAST)  # type: ignore[arg-type]
    from_onnx = evaluate(tiny["version"], None, cfg).report
    from_ckpt = evaluate(tiny["version"], tiny["checkpoint"], cfg).report
    assert from_onnx.model.white_box_weights == "model.onnx" and from_ckpt.model.white_box_weights == "checkpoint"
    assert from_onnx.model.checkpoint_parity_max_abs_diff is not None
    assert from_onnx.model.checkpoint_parity_max_abs_diff <= 1e-4
    assert from_onnx.attacks[0].status == "ok"
    assert from_onnx.attacks[0].robust_accuracy == pytest.approx(from_ckpt.attacks[0].robust_accuracy, abs=0.03)


def test_model_from_onnx_refuses_a_graph_without_named_weights(tiny, tmp_path) -> None:
    import onnx

    from training.onnx_weights import OnnxWeightsError, model_from_onnx

    m = onnx.load(str(tiny["version"] / "model.onnx"))
    for i, t in enumerate(m.graph.initializer):
        t.name = f"w{i}"
    path = tmp_path / "renamed.onnx"
    onnx.save(m, str(path))
    manifest = json.loads((tiny["version"] / "manifest.json").read_text())
    with pytest.raises(OnnxWeightsError, match="no initializer named"):
        model_from_onnx(path, manifest["training"]["model_config"])


def test_foreign_checkpoint_is_refused(tiny) -> None:
    model, ckpt = load_checkpoint(tiny["checkpoint"])
    with torch.no_grad():
        model.fc.weight.add_(0.05 * torch.randn_like(model.fc.weight))
    other = save_checkpoint(tiny["root"] / "foreign", model, ckpt)
    cfg = EvalConfig(eps=EPS, attacks=("fgsm",), sanity=False, figures=False, **FAST)  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match="does not belong"):
        evaluate(tiny["version"], other, cfg)


def test_roc_auc_and_worst_case_units() -> None:
    assert roc_auc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert roc_auc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5
    t, f = np.array([True, True, False]), np.array([False, False, True])
    a = Judged("a", correct=np.array([True, False, True]), accepted=np.array([True, True, False]),
               accepted_rho1=t, ratio=np.zeros(3), msp=np.ones(3))
    b = Judged("b", correct=np.array([False, True, True]), accepted=np.array([False, True, True]),
               accepted_rho1=f, ratio=np.zeros(3), msp=np.ones(3))
    wc = worst_case([a, b])
    assert wc.robust_accuracy == pytest.approx(1 / 3)  # only example 2 is always correct
    assert wc.defended_rate == pytest.approx(2 / 3)  # example 1 was accepted and wrong under a


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def test_cli_end_to_end(tiny) -> None:
    out = tiny["root"] / "cli"
    store = tiny["version"].parent.parent
    p = _cli("evaluate", "--store", str(store), "--name", "tiny", "--version", "v1", "--checkpoint",
             str(tiny["checkpoint"]), "--out", str(out), "--n-examples", "40", "--attacks", "fgsm,pgd,adaptive",
             "--pgd-steps", "3", "--pgd-restarts", "1", "--adaptive-steps", "3", "--adaptive-k", "1",
             "--n-budget-check", "10", "--n-sweep", "10", "--sweep-steps", "2", "--sweep-eps", "0,0.5",
             "--no-figures")
    assert p.returncode == 0, p.stderr[-2000:]
    r = Report.model_validate_json((out / "report.json").read_text())
    assert r.model.name == "tiny" and r.model.version == "v1" and r.n_examples == 40 and r.eps == 0.1
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("args, match", [
    (["--name", "tiny", "--version", "nope"], "does not exist"),
    (["--eps", "-0.1"], "eps"),
    (["--eps", "0.1", "--attacks", "fgsm,bogus"], "unknown attack"),
    (["--split", "train"], "split"),
])
def test_cli_user_errors_are_one_line(tiny, args: list[str], match: str) -> None:
    store = tiny["version"].parent.parent
    base = ["evaluate", "--store", str(store)]
    if "--name" not in args:
        base += ["--name", "tiny", "--version", "v1"]
    p = _cli(*base, *args, "--out", str(tiny["root"] / "err"))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], p.stderr


def test_figure2_trains_two_2d_models_and_plots(tmp_path: Path) -> None:
    from training.evaluation.figure2 import Figure2Config, make_figure2

    torch.set_num_threads(1)
    cfg = Figure2Config(n_train=640, epochs=1, n_test=100, pgd_steps=3, widths=(4, 8, 8))
    path = make_figure2(cfg, tmp_path)
    assert path.is_file() and path.stat().st_size > 10_000
    summary = json.loads((tmp_path / "figure2.json").read_text())
    assert len(summary["models"]) == 2
    for arch in ("dsphere", "baseline"):
        # runs are cached per configuration: runs/<arch>-<config digest>/final
        (run,) = (tmp_path / "runs").glob(f"{arch}-*")
        _, ckpt = load_checkpoint(run / "final")
        assert ckpt.model_config.fc_dim == 2 and ckpt.model_config.feature_relu is False


@pytest.mark.parametrize("path,label", [
    ("runs/reproduce/cells/baseline-fgsm/run/final", "baseline-fgsm"),
    ("runs/dsphere-fgsm/final", "dsphere-fgsm"),
    ("substitutes/ckpt-a", "ckpt-a"),
])
def test_transfer_attacks_are_named_after_the_substitute_run(path: str, label: str) -> None:
    from training.evaluation.plan import run_label

    assert run_label(path) == label


def test_detectors_follow_the_standard_protocol(full) -> None:  # type: ignore[no-untyped-def]
    """Negatives: clean inputs classified correctly; positives: the attacked versions of
    those same inputs that the attack got misclassified (issue: no misclassification mixed in)."""
    clean = full.clean
    for d in full.report.detectors:
        if d.attack == "misclassification (clean)":
            assert d.n_clean == int(clean.correct.sum()) and d.n_adversarial == int((~clean.correct).sum())
            continue
        if d.attack not in full.judged:
            continue
        adv = full.judged[d.attack]
        m = min(clean.n, adv.n)
        assert d.n_clean == int(clean.correct[:m].sum())
        assert d.n_adversarial == int((clean.correct[:m] & ~adv.correct[:m]).sum()) > 0
        assert d.protocol == "correct clean vs fooled attacked"


def test_attacks_on_the_verdict_and_their_checks(full) -> None:  # type: ignore[no-untyped-def]
    r: Report = full.report
    rule = r.attack("rule")
    schedule = rule.params["restart_schedule"]
    assert [s["restarts"] for s in schedule][:1] == [1]
    defended = [s["defended_rate"] for s in schedule]
    assert all(b <= a + 1e-12 for a, b in zip(defended, defended[1:], strict=False))  # kept by the served rule
    assert rule.defended_rate == pytest.approx(defended[-1])
    checks = r.sanity.rule
    assert checks is not None and checks.square_defended_rate is not None
    assert checks.gradient_free_ok == (checks.square_defended_rate >= checks.white_box_defended_rate
                                       - max(0.01, 2.0 / min(r.attack("rule-square").n_examples, rule.n_examples)))
    # the sweep's rule attack attacks: the defended rate under it falls as eps grows (within one
    # example's noise) and at eps 0.5 is below the clean one (a wrong-signed step or an eps not
    # passed through would leave it flat)
    sweep = r.sanity.eps_sweep
    assert sweep is not None and all(p.rule_defended_rate is not None for p in sweep.points)
    rule_def = [float(p.rule_defended_rate or 0.0) for p in sweep.points]
    assert all(b <= a + max(0.02, 2.0 / sweep.n_examples) for a, b in zip(rule_def, rule_def[1:], strict=False))
    assert rule_def[-1] < rule_def[0], rule_def
    md = render_report_markdown(r)
    assert "Inputs that are not clothing" in md and "attacks on the verdict" in md


def test_rule_attack_is_at_least_as_strong_on_the_verdict_as_pgd(full) -> None:  # type: ignore[no-untyped-def]
    """The attack that knows the rule must not leave more inputs defended than PGD (which ignores it)."""
    m = full.report.attack("rule").n_examples
    rule, pgd = full.judged["rule"], full.judged["pgd-10"]
    assert float((~rule.broken[:m]).mean()) <= float((~pgd.broken[:m]).mean()) + 0.05


def test_out_of_distribution_table_and_distal_inputs(full) -> None:  # type: ignore[no-untyped-def]
    from training.outliers import HELD_OUT, KINDS

    r: Report = full.report
    assert [o.kind for o in r.ood] == list(KINDS)
    assert {o.kind for o in r.ood if not o.trained} == set(HELD_OUT)
    assert all(o.n_examples == 60 and 0 <= o.reject_rate <= 1 for o in r.ood)
    assert {(d.start, d.eps) for d in r.distal} == {(s, e) for s in ("uniform_noise", "constant") for e in (0.1, 0.3)}
    for start in ("uniform_noise", "constant"):
        rows = sorted((d for d in r.distal if d.start == start), key=lambda d: d.eps)
        # the attack keeps an accepted start as it is: never fewer accepted than before
        assert all(d.accepted_rate >= d.start_accepted_rate - 1e-9 for d in rows)
