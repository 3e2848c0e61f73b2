"""Sanity checks that tell gradient masking from robustness (Athalye et al. 2018; Carlini et
al. 2019, "On Evaluating Adversarial Robustness"), and one of the verdict itself:

- noise: uniform-noise and constant images must be rejected (>= 99 %);

- PGD budget: doubling PGD's steps and restarts must not lower robust accuracy much;
- accuracy vs ε: PGD accuracy must fall towards 0 as ε grows, monotonically;
- gradient-free vs white-box: Square (no gradients) must not beat the best white-box attack.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from training.attacks import PGD
from training.evaluation.cache import AttackCache
from training.evaluation.config import EvalConfig
from training.evaluation.rule_attacks import RuleAttack
from training.evaluation.runner import AttackRunner, Target, made_on
from training.evaluation.schema import EpsPoint, EpsSweep, GradientFreeCheck, NoiseCheck, PgdBudgetCheck, RuleChecks
from training.evaluation.scoring import Judged, judge, rate_fields
from training.evaluation.served import ServedOutputs
from training.evaluation.settings import settings
from training.judging import OnnxModel
from training.models import ConvNet
from training.rule import Rule

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _restarts(t: Target, model: ConvNet, attack: Attack, m: int, restarts: int, seed: int, batch_size: int,
              name: str, cache: AttackCache, stem: str) -> Judged:
    """An attack with `restarts` restarts on the first m examples, each its own run (kept in `cache`
    under `stem`); per example the restart best for the attacker under the served rule (as the
    evaluation's runner keeps them)."""
    x_adv: Tensor | None = None
    worst: Judged | None = None
    for r in range(restarts):
        xa = made_on(cache, t, stem, model, attack, m, seed + r, t.eps, batch_size)
        x_adv, worst = AttackRunner.keep_worst(x_adv, worst, xa, t.judge(xa, name))
    assert worst is not None
    return worst


def pgd_budget_check(t: Target, model: ConvNet, cfg: EvalConfig, say: Callable[[str], None],
                     cache: AttackCache) -> tuple[PgdBudgetCheck, list[Judged]]:
    """Doubling PGD's steps AND restarts must not lower robust accuracy much (else the base
    attack had not converged and its numbers overstate robustness). Both runs are made here,
    on the same examples, each keeping restarts by the served rule; the doubled run's
    outcomes are returned (both runs) for the worst case per example."""
    m = min(cfg.n_budget_check, len(t.x))
    base_pgd = PGD(t.eps, steps=cfg.pgd_steps, step_size=cfg.pgd_step_size)
    dbl_pgd = replace(base_pgd, steps=2 * base_pgd.steps)
    base_n, dbl_n = cfg.pgd_restarts, 2 * cfg.pgd_restarts
    t0 = time.time()
    base = _restarts(t, model, base_pgd, m, base_n, cfg.seed, cfg.batch_size, "pgd (budget check)", cache,
                     "pgd-budget")
    dbl = _restarts(t, model, dbl_pgd, m, dbl_n, cfg.seed + 1000, cfg.batch_size,
                    f"pgd-{dbl_pgd.steps} x{dbl_n} (budget check)", cache, "pgd-budget-doubled")
    b_acc, d_acc = float(base.correct.mean()), float(dbl.correct.mean())
    b_def, d_def = float((~base.broken).mean()), float((~dbl.broken).mean())
    tol = max(0.02, 2.0 / m)
    ok = d_acc >= b_acc - tol
    verdict = (f"ok: doubling PGD's steps and restarts changed robust accuracy {b_acc:.3f} -> {d_acc:.3f} "
               f"(tolerance {tol:.3f})" if ok else
               f"PGD had not converged: doubling its steps and restarts lowered robust accuracy {b_acc:.3f} -> "
               f"{d_acc:.3f}; the PGD numbers overstate robustness")
    say(f"budget check: {verdict} ({time.time() - t0:.0f}s)")
    return PgdBudgetCheck(n_examples=m, base={**settings(base_pgd), "restarts": base_n},
                          doubled={**settings(dbl_pgd), "restarts": dbl_n}, base_robust_accuracy=b_acc,
                          doubled_robust_accuracy=d_acc, base_defended_rate=b_def, doubled_defended_rate=d_def,
                          ok=ok, verdict=verdict), [base, dbl]


def eps_sweep(t: Target, model: ConvNet, cfg: EvalConfig, say: Callable[[str], None],
              cache: AttackCache) -> tuple[EpsSweep, list[tuple[float, Judged]], list[Judged]]:
    """Accuracy under PGD must fall to ~0 as eps grows (at eps = 0.5 any image can be
    turned into uniform gray); if it does not, gradients are masked. With the rule attack in
    the evaluation, each point also has the defended rate under it (margin loss, every wrong
    class, one restart of `sweep_steps`). Returns the sweep, its PGD outcomes by ε, and the
    outcomes at the threat model's ε (PGD and the rule attack), which count in the worst case."""
    m = min(cfg.n_sweep, len(t.x))
    x = t.x[:m]
    points, judged, ran, at_eps = [], [], [], list[Judged]()
    t0 = time.time()
    for e in sorted(set(cfg.sweep_eps)):
        if e == 0:
            xa = x
        else:
            pgd = PGD(e, steps=cfg.sweep_steps)
            ran.append(pgd)
            xa = made_on(cache, t, "pgd-sweep", model, pgd, m, cfg.seed, e, cfg.batch_size)
        j = t.judge(xa, f"eps={e}")
        judged.append((e, j))
        r = rate_fields(j)
        rule_def, rule_j = None, None
        if "rule" in cfg.attacks:
            rule_j = None if e == 0 else _rule_attacked(t, model, m, e, cfg, cache)
            rule_def = r["defended_rate"] if rule_j is None else float((~rule_j.broken).mean())
        if math.isclose(e, t.eps):
            at_eps += [j] if rule_j is None else [j, rule_j]
        points.append(EpsPoint(eps=e, robust_accuracy=r["robust_accuracy"], reject_rate=r["reject_rate"],
                               defended_rate=r["defended_rate"], rule_defended_rate=rule_def))
    ok, verdict = _sweep_verdict(points, m)
    say(f"eps sweep: {verdict} ({time.time() - t0:.0f}s)")
    return EpsSweep(attack=_sweep_attack(ran), n_examples=m, points=points, ok=ok, verdict=verdict), judged, at_eps


def _sweep_attack(ran: list[PGD]) -> dict[str, Any]:
    """The sweep's PGD as it ran: its settings at every ε (eps and the step size listed per point)."""
    if not ran:
        return {"name": "pgd"}
    each = [settings(a) for a in ran]
    return {"name": "pgd", **each[-1], "eps": [s["eps"] for s in each], "step_size": [s["step_size"] for s in each]}


def _sweep_verdict(points: list[EpsPoint], m: int) -> tuple[bool, str]:
    accs = [p.robust_accuracy for p in points]
    top = points[-1]
    monotone = all(b <= a + max(0.02, 2.0 / m) for a, b in zip(accs, accs[1:], strict=False))
    ok = (top.eps < 0.3 or top.robust_accuracy <= 0.05) and monotone
    if ok:
        return ok, f"ok: PGD accuracy falls from {accs[0]:.3f} to {top.robust_accuracy:.3f} at eps {top.eps}"
    if not monotone:
        return ok, ("gradient masking suspected: accuracy does not decrease monotonically with eps "
                    f"({', '.join(f'{a:.3f}' for a in accs)})")
    return ok, (f"gradient masking suspected: PGD accuracy is still {top.robust_accuracy:.3f} at eps {top.eps} "
                "(an honest attack reaches ~0)")


def _rule_attacked(t: Target, model: ConvNet, m: int, eps: float, cfg: EvalConfig, cache: AttackCache) -> Judged:
    attack = RuleAttack(eps, t.rule, cfg.sweep_steps, 1, cfg.rule_kappa, ("margin",),
                        judge=ServedOutputs(t.onnx_model))
    xa = made_on(cache, t, "rule-sweep", model, attack, m, cfg.seed, eps, cfg.batch_size)
    return t.judge(xa, f"rule eps={eps}")


@dataclass(frozen=True)
class Doubled:
    """The rule attack with its steps and restarts doubled, beside the rule attack on the same examples."""

    settings: dict[str, Any]
    n: int
    base_defended_rate: float
    defended_rate: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.defended_rate >= self.base_defended_rate - self.tolerance


def rule_budget_check(t: Target, model: ConvNet, attack: RuleAttack, restarts: int, base: Judged,
                      cfg: EvalConfig, cache: AttackCache) -> tuple[Doubled, Judged]:
    """The rule attack (`attack`, which ran `restarts` restarts with outcomes `base`) again with
    twice its steps and twice its restarts on the first n_budget_check examples, restarts kept by
    the served rule; its outcomes count in the worst case."""
    m = min(cfg.n_budget_check, base.n)
    doubled = replace(attack, steps=2 * attack.steps)
    j = _restarts(t, model, doubled, m, 2 * restarts, cfg.seed + 1000, cfg.batch_size,
                  f"rule x{2 * restarts}, {doubled.steps} steps (budget check)", cache, "rule-budget-doubled")
    return Doubled({**settings(doubled), "restarts": 2 * restarts}, m, float((~base.broken[:m]).mean()),
                   float((~j.broken).mean()), max(cfg.rule_restart_tolerance, 2.0 / m)), j


def rule_checks(judged: dict[str, Judged], schedule: list[dict[str, object]], tolerance: float,
                doubled: Doubled | None = None) -> RuleChecks:
    """Doubling the rule attack's restarts moved the defended rate by at most `tolerance`
    (the last doubling of its schedule); doubling its steps and restarts (`doubled`) did not lower
    it by more than its tolerance; Square on the rule's margin (no gradients) is not stronger
    than the white-box rule attack."""
    rule = judged["rule"]
    budget_ok = None
    if len(schedule) > 1:
        budget_ok = float(schedule[-2]["defended_rate"]) - float(schedule[-1]["defended_rate"]) <= tolerance  # type: ignore[arg-type]
    sq_def = wb_def = gf_ok = None
    if "rule-square" in judged:
        sq = judged["rule-square"]
        m = min(sq.n, rule.n)
        sq_def, wb_def = float((~sq.broken[:m]).mean()), float((~rule.broken[:m]).mean())
        gf_ok = sq_def >= wb_def - max(0.01, 2.0 / m)
    parts = []
    if budget_ok is not None:
        parts.append(f"doubling the rule attack's restarts moved the defended rate "
                     f"{float(schedule[-2]['defended_rate']):.3f} -> {float(schedule[-1]['defended_rate']):.3f}"  # type: ignore[arg-type]
                     f" ({'within' if budget_ok else 'MORE than'} {tolerance:.2f})")
    if gf_ok is not None:
        parts.append(f"gradient-free Square on the rule {sq_def:.3f} vs white-box rule attack {wb_def:.3f} "
                     f"defended ({'not stronger' if gf_ok else 'STRONGER: the white-box rule attack is weak'})")
    if doubled is not None:
        parts.append(f"doubling the rule attack's steps and restarts moved the defended rate "
                     f"{doubled.base_defended_rate:.3f} -> {doubled.defended_rate:.3f} on {doubled.n} examples "
                     f"({'within' if doubled.ok else 'MORE than'} {doubled.tolerance:.3f})")
    ok = budget_ok is not False and gf_ok is not False and (doubled is None or doubled.ok)
    d = doubled
    return RuleChecks(budget_schedule=[dict(s) for s in schedule], budget_ok=budget_ok, square_defended_rate=sq_def,
                      white_box_defended_rate=wb_def, gradient_free_ok=gf_ok, tolerance=tolerance, ok=ok,
                      doubled=d.settings if d else None, n_doubled=d.n if d else None,
                      base_defended_rate=d.base_defended_rate if d else None,
                      doubled_defended_rate=d.defended_rate if d else None,
                      doubled_tolerance=d.tolerance if d else None, doubled_ok=d.ok if d else None,
                      verdict=("ok: " if ok else "FAILED: ") + ("; ".join(parts) or "no check possible"))


def gradient_free_check(judged: dict[str, Judged]) -> GradientFreeCheck:
    sq = judged["square"]
    wb = {k: v for k, v in judged.items() if k == "fgsm" or k.startswith("pgd") or k.startswith("apgd")}
    if not wb:
        return GradientFreeCheck(n_examples=sq.n, square_robust_accuracy=float(sq.correct.mean()),
                                 best_white_box_robust_accuracy=None, best_white_box=None, ok=True,
                                 verdict="no white-box attack to compare Square with")
    m = min([sq.n] + [v.n for v in wb.values()])
    sq_acc = float(sq.correct[:m].mean())
    best_name, best = min(((k, float(v.correct[:m].mean())) for k, v in wb.items()), key=lambda t: t[1])
    tol = max(0.02, 2.0 / m)
    ok = sq_acc >= best - tol
    verdict = (f"ok: gradient-free Square ({sq_acc:.3f}) is not stronger than {best_name} ({best:.3f})" if ok else
               f"gradient masking: gradient-free Square reaches robust accuracy {sq_acc:.3f}, below the best "
               f"white-box attack {best_name} ({best:.3f}); the white-box numbers overstate robustness")
    return GradientFreeCheck(n_examples=m, square_robust_accuracy=sq_acc, best_white_box_robust_accuracy=best,
                             best_white_box=best_name, ok=ok, verdict=verdict)


def noise_check(onnx_model: OnnxModel, shape: tuple[int, ...], rule: Rule, n: int = 1000, seed: int = 0,
                target: float = 0.99) -> NoiseCheck:
    """Reject rates of n uniform-noise images and of 11 constant images (0, 0.1, ..., 1)."""
    g = torch.Generator().manual_seed(seed)
    uniform = torch.rand((n, *shape), generator=g)
    constant = torch.linspace(0, 1, 11).view(-1, *([1] * len(shape))).expand(11, *shape).contiguous()
    ju = judge(onnx_model, uniform, torch.zeros(n, dtype=torch.long), rule, "uniform noise")
    jc = judge(onnx_model, constant, torch.zeros(11, dtype=torch.long), rule, "constant")
    u, c = float((~ju.accepted).mean()), float((~jc.accepted).mean())
    ok = u >= target and c >= target
    verdict = (f"{'ok' if ok else 'FAILED'}: rejected {100 * u:.1f} % of {n} uniform-noise images and "
               f"{100 * c:.1f} % of 11 constant images (target {100 * target:g} %)")
    return NoiseCheck(n_uniform=n, uniform_reject_rate=u, n_constant=11, constant_reject_rate=c, target=target,
                      ok=ok, verdict=verdict)
