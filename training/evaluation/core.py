"""`evaluate()`: attack a model-store version and judge every input like the service does.

- Verdicts: ONNX Runtime on the version's model.onnx, the manifest's angle statistics and
  rho, the one rule app.verdict.geodesic_verdict (training/evaluation/scoring.py). So the
  report's numbers are what the service would answer for those inputs.
- Gradients (white-box attacks): the PyTorch checkpoint that produced the version, or, by
  default when none is given, the model rebuilt from model.onnx's own weights
  (training/evaluation/loading.py); either must match the ONNX model or evaluation refuses.
- Square (gradient free) queries the ONNX model itself; transfer attacks never query it.
- PGD runs with restarts, doubled until doubling no longer lowers robust accuracy by more
  than `pgd_restart_tolerance`; each example keeps its worst outcome over all restarts.
- Every attack's adversarial inputs are cached under `out/.cache/`, keyed by the model's
  sha256, the attack, its budget and the attacked examples themselves: an interrupted evaluation, run again, resumes.

Where things live: budgets in config.py, the verdict-based rates in scoring.py, the three
rejection scores in detectors.py, the masking checks in sanity.py, the report's schema in
schema.py. A new attack is one `runner.run(...)` call below; a new rejection score one
entry in detectors.Scores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from app.manifest import MODEL_FILE, Manifest
from training.attacks import FGSM, PGD, attack_dataset
from training.checkpoint import load_checkpoint
from training.data import DEFAULT_EPS, Dataset, load_dataset, training_splits
from training.evaluation.attacks import AdaptiveAttack, ArtAPGD, ArtSquare, TransferAttack, check_ball
from training.evaluation.config import ALL_ATTACKS, EvalConfig, EvaluationError
from training.evaluation.detectors import (
    Mahalanobis,
    ScoreAttack,
    Scores,
    detector,
    features_of,
    misclassification_detector,
)
from training.evaluation.foreign import distal_table, ood_table
from training.evaluation.loading import OnnxLogits, WhiteBox, load_manifest, version_path, white_box_model
from training.evaluation.rule_attacks import OrthogonalPGD, RuleAttack, RuleScores, RuleSquare
from training.evaluation.sanity import eps_sweep, gradient_free_check, noise_check, pgd_budget_check, rule_checks
from training.evaluation.schema import AttackResult, Detector, ModelRef, Report, RuleChecks, Sanity
from training.evaluation.scoring import Judged, Outcome, judge, rate_fields, worst_case
from training.judging import OnnxModel
from training.models import ConvNet
from training.rejection import Rule

log = logging.getLogger("dsphere.evaluation")

__all__ = ["ALL_ATTACKS", "EvalConfig", "EvaluationError", "Outcome", "evaluate", "write_outputs"]

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class Target:
    """The version under attack and the evaluation subset."""

    vdir: Path
    manifest: Manifest
    onnx_model: OnnxModel
    x: Tensor
    y: Tensor
    eps: float
    rho: float

    @property
    def mean(self) -> list[float]:
        return list(self.manifest.angle_mean_deg)

    @property
    def std(self) -> list[float]:
        return list(self.manifest.angle_std_deg)

    @property
    def rule(self) -> Rule:
        return Rule(tuple(self.mean), tuple(self.std), self.rho)

    def judge(self, x_adv: Tensor, name: str) -> Judged:
        return judge(self.onnx_model, x_adv, self.y[: len(x_adv)], self.mean, self.std, self.rho, name)


class AttackRunner:
    """Runs attacks on prefixes of the evaluation subset, checks that every output stays in
    the ε-ball, judges it with ONNX Runtime and records the result (and the inputs)."""

    def __init__(self, target: Target, cfg: EvalConfig, cache: Path | None, say: Callable[[str], None]) -> None:
        self.t, self.cfg, self.cache, self.say = target, cfg, cache, say
        self.results: list[AttackResult] = []
        self.judged: dict[str, Judged] = {}
        self.inputs: dict[str, Tensor] = {}
        self.cached: dict[str, list[str]] = {}  # attack -> its files in the cache (the report's `cached_inputs`)

    def n(self, cap: int) -> int:
        return min(cap or len(self.t.x), len(self.t.x))

    def craft(self, name: str, attack: Attack, on: nn.Module, m: int, params: dict[str, Any], seed: int) -> Tensor:
        """Adversarial inputs for the first m examples, from the cache when this exact run was made."""
        examples = hashlib.sha256(self.t.x[:m].numpy().tobytes() + self.t.y[:m].numpy().tobytes()).hexdigest()
        key = hashlib.sha256(json.dumps([self.t.manifest.sha256, name, params, examples, seed, self.t.eps],
                                        sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = self.cache / f"{name.replace(':', '_')}-{key}.safetensors" if self.cache else None
        if path is not None:
            self.cached.setdefault(name, []).append(path.name)
        if path is not None and path.is_file():
            return load_file(str(path))["x_adv"]
        torch.manual_seed(seed)
        dev = next(on.parameters()).device
        x_adv = attack_dataset(on, attack, self.t.x[:m].to(dev), self.t.y[:m].to(dev), self.cfg.batch_size).cpu()
        check_ball(x_adv, self.t.x[:m], self.t.eps, name)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"x_adv": x_adv.contiguous()}, str(path))
        return x_adv

    def run(self, name: str, kind: str, attack: Attack, on: nn.Module, cap: int, params: dict[str, Any]) -> None:
        m, t0 = self.n(cap), time.time()
        x_adv = self.craft(name, attack, on, m, params, self.cfg.seed)
        self.record(name, kind, x_adv, self.t.judge(x_adv, name), params, time.time() - t0)

    def record(self, name: str, kind: str, x_adv: Tensor, j: Judged, params: dict[str, Any], seconds: float) -> None:
        self.judged[name], self.inputs[name] = j, x_adv
        res = AttackResult(name=name, kind=kind, max_perturbation=float((x_adv - self.t.x[: len(x_adv)]).abs().max()),
                           seconds=round(seconds, 1), params={"eps": self.t.eps, **params},
                           **rate_fields(j))  # type: ignore[arg-type]
        self.results.append(res)
        self.say(f"{name}: robust accuracy {res.robust_accuracy:.4f}, reject {res.reject_rate:.4f}, "
                 f"defended {res.defended_rate:.4f} on {j.n} ({res.seconds:.0f}s)")

    def skip(self, name: str, kind: str, reason: str, params: dict[str, Any] | None = None) -> None:
        self.results.append(AttackResult(name=name, kind=kind, status="skipped", reason=reason, params=params or {}))
        self.say(f"{name}: skipped ({reason})")

    def run_pgd(self, model: ConvNet) -> None:
        """PGD with restarts doubled until the doubling lowers robust accuracy by at most
        the tolerance (or the cap is reached)."""
        cfg = self.cfg
        base = {"steps": cfg.pgd_steps, "step_size": cfg.pgd_step_size, "random_start": True, "loss": "cross_entropy"}
        self.run_restarts(f"pgd-{cfg.pgd_steps}", "white-box",
                          PGD(self.t.eps, steps=cfg.pgd_steps, step_size=cfg.pgd_step_size, restarts=1), model,
                          cfg.n_pgd, base, cfg.pgd_restarts, cfg.pgd_max_restarts, cfg.pgd_restart_tolerance,
                          "robust_accuracy")

    def run_restarts(self, name: str, kind: str, attack: Attack, on: nn.Module, cap: int, base: dict[str, Any],
                     first: int, cap_restarts: int, tolerance: float, measure: str) -> list[dict[str, Any]]:
        """Restarts (one crafted run each, own seed, cached) doubled until the doubling moves
        `measure` ("robust_accuracy" or "defended_rate") by at most `tolerance` or the cap is
        reached. Per example the restart best for the attacker under the SERVED rule is kept:
        accepted-and-wrong first, then misclassified (rejected). Returns the schedule."""
        t0, m = time.time(), self.n(cap)
        x_adv: Tensor | None = None
        worst: Judged | None = None
        total, batch, schedule = 0, first, list[dict[str, Any]]()
        while True:
            for r in range(total, total + batch):
                xb = self.craft(name, attack, on, m, {**base, "restart": r}, self.cfg.seed + r)
                jb = self.t.judge(xb, name)
                if x_adv is None or worst is None:
                    x_adv, worst = xb, jb
                else:
                    take = worst.attacker_best(jb)
                    x_adv = torch.where(torch.from_numpy(take).view(-1, 1, 1, 1), xb, x_adv)
                    worst = worst.where(take, jb)  # the merged inputs' verdicts, without running them again
            total += batch
            assert worst is not None  # batch >= 1
            schedule.append({"restarts": total, "robust_accuracy": float(worst.correct.mean()),
                             "defended_rate": float((~worst.broken).mean())})
            converged = len(schedule) > 1 and schedule[-2][measure] - schedule[-1][measure] <= tolerance
            if converged or 2 * total > cap_restarts:
                break
            batch = total
        assert x_adv is not None and worst is not None
        params = {**base, "restarts": total, "restart_schedule": schedule, "converged": converged,
                  "restart_tolerance": tolerance, "restarts_kept_by": "served rule (accepted-and-wrong first)"}
        curve = ", ".join(f"{s['restarts']}: {s[measure]:.4f}" for s in schedule)
        self.say(f"{name}: {measure.replace('_', ' ')} by restarts {curve} "
                 f"({'converged' if converged else 'restart cap'})")
        self.record(name, kind, x_adv, worst, params, time.time() - t0)
        return schedule


def evaluate(version_dir: str | Path, checkpoint: str | Path | None, cfg: EvalConfig, out: str | Path | None = None,
             command: str = "", progress: Callable[[str], None] | None = None) -> Outcome:
    """Run the configured attacks; write report.json, report.md and figures into `out`."""
    t_start = time.time()
    logging.getLogger("art").setLevel(logging.WARNING)
    say = progress or (lambda s: log.info("%s", s))
    target = _target(version_dir, cfg)
    wb = white_box_model(target.vdir, target.manifest, target.onnx_model, checkpoint, cfg.weights_from_onnx,
                         target.x[:16])
    if wb.model is not None:
        say(f"white-box attacks on the PyTorch model from {wb.source} (max abs diff {wb.parity:.1e} to model.onnx)")
        wb.model.to(_device(cfg.device))
    clean = target.judge(target.x, "clean")
    say(f"clean: accuracy {clean.correct.mean():.4f}, reject {(~clean.accepted).mean():.4f} at rho {target.rho:.3f}")

    runner = AttackRunner(target, cfg, Path(out) / ".cache" if out is not None else None, say)
    warnings = [wb.unavailable] if wb.model is None and cfg.weights_from_onnx and checkpoint is None else []
    _white_box_attacks(runner, wb)
    _black_box_attacks(runner, wb, warnings)
    rule_checks = verdict_attacks(runner, wb)

    done = [clean, *runner.judged.values()]
    sanity, sweep, doubled = _sanity(runner, wb.model)
    if doubled is not None:  # the budget check's doubled PGD counts in the worst case per example
        done.append(doubled.padded(len(target.x), clean))
    sanity.rule = rule_checks
    ood = ood_table(target.onnx_model, target.x, target.rule, cfg) if cfg.ood else []
    distal = (distal_table(wb.model, target.onnx_model, tuple(target.manifest.input.shape), target.rule, cfg, say)
              if cfg.ood and wb.model is not None else [])
    distal_skipped = wb.unavailable if cfg.ood and wb.model is None else None
    if distal_skipped is not None:
        say(f"distal attack: skipped ({distal_skipped})")
    warnings += [c.verdict for c in (sanity.noise, sanity.pgd_budget, sanity.eps_sweep, sanity.gradient_free,
                                     sanity.rule) if c is not None and not c.ok]
    detectors = _detectors(runner, clean, wb.model) if cfg.detectors else []
    report = _report(target, cfg, command, checkpoint, wb, clean, runner.results, done, detectors, sanity, warnings)
    report.ood, report.distal, report.distal_skipped = ood, distal, distal_skipped
    report.cached_inputs = runner.cached if out is not None else None
    outcome = Outcome(report, runner.judged, clean, sweep)
    outcome.report.seconds = round(time.time() - t_start, 1)
    if out is not None:
        write_outputs(outcome, Path(out), cfg.figures)
    return outcome


def verdict_attacks(runner: AttackRunner, wb: WhiteBox) -> RuleChecks | None:
    """The attacks aimed at the verdict (rule_attacks.py) and their two checks."""

    cfg, t, want = runner.cfg, runner.t, set(runner.cfg.attacks)
    rule, schedule = t.rule, list[dict[str, Any]]()
    knows = {"knows": "angle statistics and rho", "rho": t.rho, "kappa": cfg.rule_kappa}
    if "rule" in want:
        base = {**knows, "steps": cfg.rule_steps, "targets": "every wrong class", "losses": ["margin", "cosine"],
                "cosine_targets": cfg.rule_cosine_targets, "step_size": "2 eps / sqrt(steps), decaying, backtracking",
                "loss_margin": "min(logit margin of target, kappa (cos theta_t - cos tau_t))",
                "loss_cosine": "cos(x, W_t) - 10 relu(max_{j!=t} z_j - z_t + 0.5)"}
        if wb.model is None:
            runner.skip("rule", "adaptive", wb.unavailable, base)
        else:
            attack = RuleAttack(t.eps, rule, cfg.rule_steps, 1, cfg.rule_kappa, cosine_targets=cfg.rule_cosine_targets)
            schedule = runner.run_restarts("rule", "adaptive", attack, wb.model, cfg.n_rule, base, cfg.rule_restarts,
                                           cfg.rule_max_restarts, cfg.rule_restart_tolerance, "defended_rate")
    if "orthogonal" in want:
        params = {**knows, "steps": cfg.orthogonal_steps, "step_size": 2.5 * t.eps / cfg.orthogonal_steps,
                  "selective": True}
        if wb.model is None:
            runner.skip("orthogonal", "adaptive", wb.unavailable, params)
        else:
            runner.run("orthogonal", "adaptive", OrthogonalPGD(t.eps, rule, cfg.orthogonal_steps), wb.model,
                       cfg.n_orthogonal, params)
    if "rule-square" in want:
        params = {**knows, "max_queries": cfg.rule_square_queries, "p_init": 0.8, "library": "ART",
                  "queries": "model.onnx (ONNX Runtime)", "scores": "rule margins, true class floored"}
        runner.run("rule-square", "black-box", RuleSquare(t.eps, rule, cfg.rule_square_queries, kappa=cfg.rule_kappa),
                   RuleScores(t.onnx_model, rule, t.manifest.num_classes, cfg.rule_kappa), cfg.n_rule_square, params)
    if "rule" not in runner.judged:
        return None
    return rule_checks(runner.judged, schedule, cfg.rule_restart_tolerance)


def _device(name: str) -> torch.device:
    from training.distributed import resolve_device

    return resolve_device(name)


def _target(version_dir: str | Path, cfg: EvalConfig) -> Target:
    vdir = version_path(version_dir)
    manifest = load_manifest(vdir)
    dataset = manifest.training.dataset
    if cfg.split == "test":
        examples = load_dataset(dataset, "test", cfg.data_dir or manifest.training.training_config.get("data_dir"))
    else:
        examples = _splits(manifest, cfg)[1]
    n = min(cfg.n_examples, len(examples))
    x, y = examples.images[:n], examples.labels[:n]
    if tuple(x.shape[1:]) != tuple(manifest.input.shape):
        raise EvaluationError(f"{dataset} images are {tuple(x.shape[1:])}, the model takes {manifest.input.shape}")
    eps = cfg.eps if cfg.eps is not None else DEFAULT_EPS[dataset]
    rho = cfg.rho if cfg.rho is not None else manifest.rho
    return Target(vdir, manifest, OnnxModel(vdir / MODEL_FILE), x, y, eps, rho)


def _white_box_attacks(runner: AttackRunner, wb: WhiteBox) -> None:
    cfg, eps, want = runner.cfg, runner.t.eps, set(runner.cfg.attacks)
    pgd_params = {"steps": cfg.pgd_steps, "step_size": cfg.pgd_step_size, "restarts": cfg.pgd_restarts}
    apgd = [(short, loss) for loss, short in (("cross_entropy", "apgd-ce"), ("difference_logits_ratio", "apgd-dlr"))
            if short in want]
    if wb.model is None:
        skipped: list[tuple[str, dict[str, Any]]] = [("fgsm", {})] if "fgsm" in want else []
        skipped += [(f"pgd-{cfg.pgd_steps}", pgd_params)] if "pgd" in want else []
        for name, params in skipped + [(short, {"loss": loss}) for short, loss in apgd]:
            runner.skip(name, "white-box", wb.unavailable, params)
        return
    if "fgsm" in want:
        runner.run("fgsm", "white-box", FGSM(eps), wb.model, 0, {"step_size": eps, "random_start": False})
    if "pgd" in want:
        runner.run_pgd(wb.model)
    for short, loss in apgd:
        params = {"max_iter": cfg.apgd_iter, "restarts": cfg.apgd_restarts, "loss": loss, "library": "ART"}
        runner.run(short, "white-box", ArtAPGD(eps, loss, cfg.apgd_iter, cfg.apgd_restarts, cfg.batch_size),
                   wb.model, cfg.n_apgd, params)


def _black_box_attacks(runner: AttackRunner, wb: WhiteBox, warnings: list[str]) -> None:
    """Square on model.onnx, transfer from each substitute, and the adaptive attack."""
    cfg, t, want = runner.cfg, runner.t, set(runner.cfg.attacks)
    if "square" in want:
        params = {"max_queries": cfg.square_queries, "restarts": cfg.square_restarts, "p_init": 0.8,
                  "library": "ART", "queries": "model.onnx (ONNX Runtime)"}
        runner.run("square", "black-box", ArtSquare(t.eps, cfg.square_queries, cfg.square_restarts,
                                                    batch_size=cfg.batch_size),
                   OnnxLogits(t.onnx_model, t.manifest.num_classes), cfg.n_square, params)
    if "transfer" in want:
        if not cfg.substitutes:
            runner.skip("transfer", "transfer", "no --substitute checkpoints given (train independent substitutes, "
                        "e.g. a baseline CNN and a D-SphereNet with another seed, and pass them)")
        for sub_path in cfg.substitutes:
            _transfer(runner, wb, sub_path, warnings)
    adv_params = {"k": cfg.adaptive_k, "steps": cfg.adaptive_steps, "restarts": cfg.adaptive_restarts,
                  "step_size": 2.5 * t.eps / cfg.adaptive_steps, "c": cfg.adaptive_c, "margin": cfg.adaptive_margin,
                  "knows": "angle statistics and rho", "rho": t.rho,
                  "loss": "-cos(x, W_t) + c relu(max_{j!=t} z_j - z_t + margin), best over k targets"}
    if "adaptive" in want:
        if wb.model is None:
            runner.skip("adaptive", "adaptive", wb.unavailable, adv_params)
            return
        attack = AdaptiveAttack(t.eps, tuple(t.mean), tuple(t.std), t.rho, cfg.adaptive_k, cfg.adaptive_steps,
                                cfg.adaptive_restarts, None, cfg.adaptive_c, cfg.adaptive_margin)
        runner.run("adaptive", "adaptive", attack, wb.model, cfg.n_adaptive, adv_params)


def _transfer(runner: AttackRunner, wb: WhiteBox, sub_path: str, warnings: list[str]) -> None:
    cfg, t = runner.cfg, runner.t
    sub, sub_ckpt = load_checkpoint(sub_path)
    sub.to(_device(cfg.device))
    if tuple(sub.config.input_shape) != tuple(t.manifest.input.shape):
        raise EvaluationError(f"substitute {sub_path} takes inputs {sub.config.input_shape}, "
                              f"not {tuple(t.manifest.input.shape)}")
    label = _run_label(sub_path)
    while f"transfer:{label}" in runner.judged:
        label += "'"
    if wb.model is not None and _same_weights(sub, wb.model):
        warnings.append(f"substitute {sub_path} has the target's weights: that is a white-box attack")
    step = 2.5 * t.eps / cfg.transfer_steps
    params = {"substitute": str(sub_path), "substitute_arch": sub.config.arch,
              "substitute_mode": sub_ckpt.training_config.get("mode"),
              "substitute_seed": sub_ckpt.training_config.get("seed"),
              "inner": "pgd", "steps": cfg.transfer_steps, "step_size": step, "restarts": cfg.transfer_restarts}
    inner = PGD(t.eps, steps=cfg.transfer_steps, step_size=step, restarts=cfg.transfer_restarts)
    runner.run(f"transfer:{label}", "transfer", TransferAttack(sub.eval(), inner), sub, cfg.n_transfer, params)


def _sanity(runner: AttackRunner, model: ConvNet | None) -> tuple[Sanity, list[tuple[float, Judged]], Judged | None]:
    cfg, t = runner.cfg, runner.t
    sanity, sweep, doubled = Sanity(), list[tuple[float, Judged]](), None
    sanity.noise = noise_check(t.onnx_model, tuple(t.manifest.input.shape), t.mean, t.std, t.rho, seed=cfg.seed)
    runner.say(f"noise check: {sanity.noise.verdict}")
    if cfg.sanity and model is not None:
        sanity.pgd_budget, doubled = pgd_budget_check(model, t.onnx_model, t.x, t.y, t.eps, t.mean, t.std, t.rho,
                                                      cfg, runner.say)
        sanity.eps_sweep, sweep = eps_sweep(model, t.onnx_model, t.x, t.y, t.mean, t.std, t.rho, cfg, runner.say)
    if "square" in runner.judged:
        sanity.gradient_free = gradient_free_check(runner.judged)
    return sanity, sweep, doubled


def _detectors(runner: AttackRunner, clean: Judged, model: ConvNet | None) -> list[Detector]:
    """The three rejection scores on PGD's and the adaptive attack's inputs (detectors.py)."""
    cfg, t = runner.cfg, runner.t
    names = [n for n in (f"pgd-{cfg.pgd_steps}", "apgd-ce", "adaptive", "rule") if n in runner.judged]
    if not names:
        return []
    train, val = _splits(t.manifest, cfg)
    maha: Mahalanobis | None = None
    if model is not None:
        fit = train if not cfg.n_feature_fit else train.subset(slice(0, cfg.n_feature_fit))
        maha = Mahalanobis.fit(features_of(model, fit.images), fit.labels.numpy(), t.manifest.num_classes)

    def scores(x: Tensor, j: Judged) -> Scores:
        return Scores.of(j, maha.distance(features_of(model, x)) if maha is not None and model is not None else None)

    val_judged = judge(t.onnx_model, val.images, val.labels, t.mean, t.std, t.rho, "validation")
    val_scores, clean_scores = scores(val.images, val_judged), scores(t.x, clean)
    false_reject = t.manifest.calibration.target_false_reject_rate
    found = [detector(n, clean_scores, clean, scores(runner.inputs[n], runner.judged[n]), runner.judged[n],
                      val_scores, t.rho, false_reject) for n in names]
    if model is not None:
        found += _score_attacks(runner, model, maha, scores, clean, clean_scores, val_scores, false_reject)
    found.append(misclassification_detector(clean_scores, clean, val_scores, t.rho, false_reject))
    return [d for d in found if d is not None]


def _score_attacks(runner: AttackRunner, model: ConvNet, maha: Mahalanobis | None,
                   scores: Callable[[Tensor, Judged], Scores], clean: Judged, clean_scores: Scores,
                   val_scores: Scores, false_reject: float) -> list[Detector | None]:
    """Each other rejection score attacked adaptively (detectors.ScoreAttack), so that its catch
    rate is a measurement and not an upper bound; the angle faces the rule attack."""
    cfg, t = runner.cfg, runner.t
    m = runner.n(cfg.n_rule)
    out: list[Detector | None] = []
    for name in ("max softmax probability", "Mahalanobis distance"):
        if name.startswith("Mahalanobis") and maha is None:
            continue
        threshold = float(np.quantile(val_scores.named()[name], 1 - false_reject))
        params = {"score": name, "threshold": threshold, "targets": 3, "steps": cfg.rule_steps,
                  "kappa": cfg.rule_kappa}
        slug = "adaptive-msp" if name.startswith("max") else "adaptive-mahalanobis"
        x_adv = runner.craft(slug, ScoreAttack(t.eps, name, threshold, maha, 3, cfg.rule_steps, cfg.rule_kappa),
                             model, m, params, cfg.seed)
        j = t.judge(x_adv, slug)
        adv_scores = scores(x_adv, j)
        d = detector(f"adaptive on {name}", clean_scores, clean, adv_scores, j, val_scores, t.rho, false_reject)
        broken = ~j.correct & (adv_scores.named()[name] <= threshold)
        runner.say(f"{slug}: the {name} rule defends {100 * (1 - broken.mean()):.1f} % of {j.n}")
        if d is not None:
            d.adaptive_against, d.score_defended_rate = name, float(1 - broken.mean())
        out.append(d)
    return out


def _splits(manifest: Manifest, cfg: EvalConfig) -> tuple[Dataset, Dataset]:
    """The version's training and validation splits, as its training run made them."""
    tc = manifest.training.training_config
    return _training_splits(manifest.training.dataset, cfg.data_dir or tc.get("data_dir"), int(tc.get("n_val", 5000)))


# A validation run reads the training split for its examples and again for the detectors: once.
_training_splits = functools.lru_cache(maxsize=1)(training_splits)


def _report(t: Target, cfg: EvalConfig, command: str, checkpoint: str | Path | None, wb: WhiteBox, clean: Judged,
            results: list[AttackResult], done: list[Judged], detectors: list[Detector], sanity: Sanity,
            warnings: list[str]) -> Report:
    cr = rate_fields(clean)
    m = t.manifest
    return Report(
        created_at=datetime.now(UTC), command=command,
        model=ModelRef(name=m.name, version=m.version, sha256=m.sha256, path=str(t.vdir),
                       dataset=m.training.dataset, checkpoint=str(checkpoint) if checkpoint else None,
                       white_box_weights=wb.source, checkpoint_parity_max_abs_diff=wb.parity),  # type: ignore[arg-type]
        eps=t.eps, split=cfg.split, n_examples=len(t.x), rho=t.rho,  # type: ignore[arg-type]  # checked in EvalConfig
        rho_source="manifest" if cfg.rho is None else "override",
        angle_mean_deg=t.mean, angle_std_deg=t.std,
        clean_accuracy=cr["robust_accuracy"], clean_reject_rate=cr["reject_rate"],
        clean_accepted_accuracy=cr["accepted_accuracy"] or 0.0, clean_defended_rate=cr["defended_rate"],
        clean_rho1_reject_rate=cr["rho1_reject_rate"], attacks=results,
        worst_case=worst_case(done, note="over the examples every attack ran on (a prefix of the evaluation subset)"),
        worst_case_all_examples=worst_case(done, n=len(t.x), note="over all evaluated examples; each counted against "
                                           "the attacks that ran on it (an upper bound on robustness)"),
        detectors=detectors, sanity=sanity, warnings=warnings)


def write_outputs(outcome: Outcome, out: Path, figures: bool = True) -> None:
    from training.evaluation.markdown import render_report_markdown

    out.mkdir(parents=True, exist_ok=True)
    if figures:
        from training.evaluation.figures import write_figures

        outcome.report.figures = write_figures(outcome, out)
    (out / "report.json").write_text(outcome.report.model_dump_json(indent=2) + "\n")
    (out / "report.md").write_text(render_report_markdown(outcome.report))


def _run_label(path: str | Path) -> str:
    """A checkpoint's name for the report: the nearest folder above it that is not a generic
    one (runs/reproduce/cells/baseline-fgsm/run/final -> baseline-fgsm)."""
    generic = {"final", "last", "best", "run", "runs", "checkpoints", ""}
    p = Path(path)
    for part in (p, *p.parents):
        if part.name not in generic:
            return part.name
    return p.name or "substitute"


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)

