"""A manifest's attack figures from the evaluation report they must come from: reading a report
for export (`read_report`), its PGD and worst-case figures (`pgd_from_report`,
`worst_case_from_report`), and how a manifest differs from its report (`report_mismatches`, which
tests/training/test_published_reports.py holds every bundled manifest to).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.manifest import AttackSpec, ManifestMetrics
from training.evaluation.schema import Report


class ExportError(ValueError):
    """Export refused or failed a check; one line for the user."""


@dataclass(frozen=True)
class PgdFigures:
    """The manifest's pgd_* figures at rho and at rho = 1, and the attack behind them."""

    robust_accuracy: float
    reject_rate: float
    defended_rate: float
    rho1_reject_rate: float
    rho1_defended_rate: float
    attack: AttackSpec


def check_report_target(report: Report, evaluation: str | os.PathLike[str] | None, sha: str, rho: float) -> None:
    """The report must judge this very export: the same model.onnx bytes and the same rho."""
    if report.model.sha256 != sha:
        raise ExportError(f"--evaluation {evaluation} was made on a model.onnx with sha256 "
                          f"{report.model.sha256[:12]}..., this export's is {sha[:12]}...: evaluate an export "
                          "of this same checkpoint (e.g. into a staging store) and pass that report")
    if not math.isclose(report.rho, rho, rel_tol=1e-9):
        raise ExportError(f"--evaluation {evaluation} judged verdicts at rho {report.rho}, this export "
                          f"calibrates {rho}: export with the options the evaluated version was exported with")


def read_report(path: str | os.PathLike[str], eps: float) -> Report:
    try:
        report = Report.model_validate_json(Path(path).read_text())
    except OSError as e:
        raise ExportError(f"--evaluation {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ExportError(f"--evaluation {path} is not an evaluation report: {str(e).splitlines()[0]}") from None
    if report.split != "test":
        raise ExportError(f"--evaluation {path} attacked the {report.split} split; the manifest's metrics come "
                          "from the test set")
    if not math.isclose(report.eps, eps):
        raise ExportError(f"--evaluation {path} attacked at eps {report.eps}, the manifest's threat model is {eps}")
    if not any(a.name.startswith("pgd-") and a.status == "ok" for a in report.attacks):
        raise ExportError(f"--evaluation {path} has no PGD result")
    return report


def pgd_from_report(report: Report) -> PgdFigures:
    a = next(a for a in report.attacks if a.name.startswith("pgd-") and a.status == "ok")
    assert a.robust_accuracy is not None and a.reject_rate is not None and a.defended_rate is not None
    assert a.rho1_reject_rate is not None and a.rho1_defended_rate is not None
    p = a.params
    return PgdFigures(a.robust_accuracy, a.reject_rate, a.defended_rate, a.rho1_reject_rate, a.rho1_defended_rate,
                      AttackSpec(eps=report.eps, steps=int(p["steps"]), step_size=float(p["step_size"]),
                                 restarts=int(p["restarts"]), n_examples=a.n_examples))


def worst_case_from_report(report: Report) -> dict[str, Any]:
    """The manifest's worst-case figures; `adaptive_defended_rate` is the lowest defended rate
    of the attacks that know the rule (kind "adaptive": the adaptive, rule and orthogonal attacks)."""
    wc = report.worst_case
    adaptive = [a.defended_rate for a in report.attacks
                if a.kind == "adaptive" and a.status == "ok" and a.defended_rate is not None]
    return {"worst_case_robust_accuracy": wc.robust_accuracy, "worst_case_defended_rate": wc.defended_rate,
            "adaptive_defended_rate": min(adaptive) if adaptive else None,
            "worst_case_attacks": [n for n in wc.attacks if n != "clean"], "worst_case_n_examples": wc.n_examples}


# A manifest's figures are the report's, copied: equal up to float rounding in JSON.
REPORT_FIGURES_ATOL = 1e-9


def report_mismatches(metrics: ManifestMetrics, report: Report) -> list[str]:
    """How a manifest's attack figures differ from the evaluation report they must come from
    (empty when they agree): the PGD figures, the worst case and its attack list."""
    want = {**worst_case_from_report(report)}
    pgd = pgd_from_report(report)
    want.update(pgd_robust_accuracy=pgd.robust_accuracy, pgd_reject_rate=pgd.reject_rate,
                pgd_defended_rate=pgd.defended_rate)
    have = metrics.model_dump()
    out = []
    for key, value in want.items():
        got = have.get(key)
        same = (got == value if not isinstance(value, float) or got is None
                else math.isclose(got, value, rel_tol=0.0, abs_tol=REPORT_FIGURES_ATOL))
        if not same:
            out.append(f"{key}: manifest {got!r}, report {value!r}")
    if have.get("pgd_attack") and have["pgd_attack"].get("restarts") != pgd.attack.restarts:
        out.append(f"pgd_attack.restarts: manifest {have['pgd_attack'].get('restarts')}, report {pgd.attack.restarts}")
    return out
