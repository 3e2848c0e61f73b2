"""`evaluate()`: attack a model-store version and judge every input like the service does.

- Verdicts: ONNX Runtime on the version's model.onnx, the manifest's angle statistics and
  rho, the one rule app.verdict.geodesic_verdict (training/rule.py, scoring.py). So the
  report's numbers are what the service would answer for those inputs.
- Gradients (white-box attacks): the PyTorch checkpoint that produced the version, or, by
  default when none is given, the model rebuilt from model.onnx's own weights
  (loading.py); either must match the ONNX model or evaluation refuses.
- Square (gradient free) queries the ONNX model itself; transfer attacks never query it.
- PGD and the rule attack run with restarts, doubled until doubling no longer moves their
  measure by more than the tolerance; each example keeps its worst outcome over all restarts.
- Every attack's adversarial inputs are cached under `out/.cache/` (cache.py), keyed by the
  model's sha256, the attack, its settings and the attacked examples themselves: an
  interrupted evaluation, run again, resumes.

Where things live: budgets in config.py; which attacks run with which settings in plan.py (the
attack objects; settings.py serializes what ran into the report); the target, the cached runner
and restarts in runner.py and cache.py; the attacks in attacks.py (APGD, Square, adaptive,
transfer) and rule_attacks.py (the attacks on the verdict); the verdict-based rates and the worst
case in scoring.py; the three rejection scores and the adaptive attacks on them in detectors.py;
the masking checks in sanity.py; inputs that are not clothing in foreign.py; the report and its
files in report.py, its schema in schema.py. A new attack is one `Planned` in plan.py; a new
rejection score one entry in detectors.Scores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from training.evaluation import plan
from training.evaluation.cache import AttackCache
from training.evaluation.config import ALL_ATTACKS, EvalConfig, EvaluationError
from training.evaluation.detectors import detector_table
from training.evaluation.foreign import distal_table, ood_table
from training.evaluation.loading import WhiteBox, white_box_model
from training.evaluation.report import build_report, write_outputs
from training.evaluation.runner import AttackRunner, Target, load_target
from training.evaluation.sanity import (
    eps_sweep,
    gradient_free_check,
    noise_check,
    pgd_budget_check,
    rule_budget_check,
    rule_checks,
)
from training.evaluation.schema import DistalResult, OodResult, Sanity
from training.evaluation.scoring import Judged, Outcome

# the subfolder of an evaluation's cache that keeps the checks' runs (budget checks, the ε sweep, distal)
CHECKS = "checks"

log = logging.getLogger("dsphere.evaluation")

__all__ = ["ALL_ATTACKS", "EvalConfig", "EvaluationError", "Outcome", "evaluate", "write_outputs"]


def evaluate(version_dir: str | Path, checkpoint: str | Path | None, cfg: EvalConfig, out: str | Path | None = None,
             command: str = "", progress: Callable[[str], None] | None = None) -> Outcome:
    """Run the configured attacks; write report.json, report.md and figures into `out`."""
    t_start = time.time()
    logging.getLogger("art").setLevel(logging.WARNING)
    say = progress or (lambda s: log.info("%s", s))
    target = load_target(version_dir, cfg)
    wb = _white_box(target, cfg, checkpoint, say)
    clean = target.judge(target.x, "clean")
    say(f"clean: accuracy {clean.correct.mean():.4f}, reject {(~clean.accepted).mean():.4f} "
        f"at rho {target.rule.rho:.3f}")

    runner = AttackRunner(target, cfg, AttackCache(Path(out) / ".cache" if out is not None else None), say)
    warnings = [wb.unavailable] if wb.model is None and cfg.weights_from_onnx and checkpoint is None else []
    for planned in [*plan.white_box(cfg, target, wb), *plan.black_box(cfg, target, wb, warnings),
                    *plan.on_the_verdict(cfg, target, wb)]:
        runner.execute(planned)

    sanity, sweep = _sanity(runner, wb)
    ood, distal, distal_skipped = _not_clothing(runner, wb)
    warnings += [c.verdict for c in (sanity.noise, sanity.pgd_budget, sanity.eps_sweep, sanity.gradient_free,
                                     sanity.rule) if c is not None and not c.ok]
    detectors = detector_table(runner, clean, wb.model) if cfg.detectors else []
    # every input judged at the threat model's eps counts in the worst case per example: the attacks,
    # the budget checks' doubled runs, the sweep's runs at eps and the attacks on the other scores
    # (each on the examples it ran on, the clean outcome elsewhere)
    done = [clean, *runner.judged.values(), *(j.padded(len(target.x), clean) for j in runner.also_judged)]
    report = build_report(runner, wb, clean, done, command=command, checkpoint=checkpoint, detectors=detectors,
                          sanity=sanity, warnings=warnings)
    report.ood, report.distal, report.distal_skipped = ood, distal, distal_skipped
    report.cached_inputs = runner.cached if out is not None else None
    outcome = Outcome(report, runner.judged, clean, sweep, runner.ran)
    outcome.report.seconds = round(time.time() - t_start, 1)
    if out is not None:
        write_outputs(outcome, Path(out), cfg.figures)
    return outcome


def _white_box(target: Target, cfg: EvalConfig, checkpoint: str | Path | None, say: Callable[[str], None]) -> WhiteBox:
    from training.distributed import resolve_device

    wb = white_box_model(target.vdir, target.manifest, target.onnx_model, checkpoint, cfg.weights_from_onnx,
                         target.x[:16])
    if wb.model is not None:
        say(f"white-box attacks on the PyTorch model from {wb.source} (max abs diff {wb.parity:.1e} to model.onnx)")
        wb.model.to(resolve_device(cfg.device))
    return wb


def _sanity(runner: AttackRunner, wb: WhiteBox) -> tuple[Sanity, list[tuple[float, Judged]]]:
    """The noise check, the PGD budget check and the ε sweep (white-box), Square against the
    white-box attacks, and the two checks of the attacks on the verdict. What they judged at the
    threat model's ε goes to `runner.also_judged` (the worst case)."""
    cfg, t, model = runner.cfg, runner.t, wb.model
    checks = runner.cache.within(CHECKS)  # the checks' runs, kept apart from the attacks' own inputs
    sanity, sweep = Sanity(), list[tuple[float, Judged]]()
    sanity.noise = noise_check(t.onnx_model, tuple(t.manifest.input.shape), t.rule, seed=cfg.seed)
    runner.say(f"noise check: {sanity.noise.verdict}")
    if cfg.sanity and model is not None:
        sanity.pgd_budget, budget_runs = pgd_budget_check(t, model, cfg, runner.say, checks)
        sanity.eps_sweep, sweep, at_eps = eps_sweep(t, model, cfg, runner.say, checks)
        runner.also_judged += [*budget_runs, *at_eps]
    if "square" in runner.judged:
        sanity.gradient_free = gradient_free_check(runner.judged)
    if "rule" in runner.judged:
        schedule, doubled = runner.schedules.get("rule", []), None
        if cfg.sanity and model is not None and schedule:
            doubled, j = rule_budget_check(t, model, runner.ran["rule"], schedule[-1]["restarts"],
                                           runner.judged["rule"], cfg, checks)
            runner.say(f"rule budget check: doubled steps and restarts, defended {doubled.base_defended_rate:.3f} "
                       f"-> {doubled.defended_rate:.3f} on {doubled.n}")
            runner.also_judged.append(j)
        sanity.rule = rule_checks(runner.judged, schedule, cfg.rule_restart_tolerance, doubled)
    return sanity, sweep


def _not_clothing(runner: AttackRunner, wb: WhiteBox) -> tuple[list[OodResult], list[DistalResult], str | None]:
    """The out-of-distribution table, the distal attack (white-box), and why it was skipped."""
    cfg, t = runner.cfg, runner.t
    if not cfg.ood:
        return [], [], None
    ood = ood_table(t.onnx_model, t.x, t.rule, cfg)
    if wb.model is None:
        runner.say(f"distal attack: skipped ({wb.unavailable})")
        return ood, [], wb.unavailable
    distal = distal_table(wb.model, t.onnx_model, tuple(t.manifest.input.shape), t.rule, cfg, runner.say,
                          runner.cache.within(CHECKS), t.manifest.sha256)
    return ood, distal, None
