"""`python -m training compare`: evaluation reports side by side, one column a model, one row
a measurement (clean, every attack, the worst case, the rejection scores, the ε sweep, the
masking checks), so that two models evaluated alike can be read row by row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.evaluation.paired import BOOTSTRAP_SAMPLES, OUTCOMES, compare_reports, describe
from training.evaluation.schema import AttackResult, Report

Cell = Callable[[Report], str]


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _attack(name: str, field: str) -> Cell:
    def cell(r: Report) -> str:
        a = _find(r, name)
        return "—" if a is None or a.status != "ok" else _pct(getattr(a, field))
    return cell


def _find(r: Report, name: str) -> AttackResult | None:
    return next((a for a in r.attacks if a.name == name), None)


def _transfer_names(reports: list[Report]) -> list[str]:
    """Transfer rows by substitute; a report's own model never appears as its substitute."""
    seen: list[str] = []
    for r in reports:
        seen += [a.name for a in r.attacks if a.kind == "transfer" and a.status == "ok" and a.name not in seen]
    return seen


def _rows(reports: list[Report]) -> list[tuple[str, Cell]]:
    rows: list[tuple[str, Cell]] = [
        ("threat model", lambda r: f"L∞ ε = {r.eps:g}, n = {r.n_examples} {r.split}"),
        ("ρ (5 % clean false-reject on validation)", lambda r: f"{r.rho:.4f}"),
        ("clean accuracy", lambda r: _pct(r.clean_accuracy)),
        ("clean reject rate", lambda r: _pct(r.clean_reject_rate)),
        ("accuracy on accepted clean inputs", lambda r: _pct(r.clean_accepted_accuracy)),
    ]
    names = list(dict.fromkeys(a.name for r in reports for a in r.attacks if a.kind != "transfer"))
    for name in names + _transfer_names(reports):
        rows.append((f"{name}: robust accuracy", _attack(name, "robust_accuracy")))
        rows.append((f"{name}: defended", _attack(name, "defended_rate")))
    rows += [
        ("**worst case per example: robust accuracy**", lambda r: f"**{_pct(r.worst_case.robust_accuracy)}**"),
        ("**worst case per example: defended**", lambda r: f"**{_pct(r.worst_case.defended_rate)}**"),
        ("worst case: n, attacks", lambda r: f"{r.worst_case.n_examples}, {len(r.worst_case.attacks) - 1} attacks"),
    ]
    for attack in dict.fromkeys(d.attack for r in reports for d in r.detectors):
        scores = dict.fromkeys(s.score for r in reports for d in r.detectors if d.attack == attack for s in d.scores)
        for score in scores:
            rows.append((f"{attack}: {score}: AUROC / caught", _detector_cell(attack, score)))
    sweep = sorted({p.eps for r in reports if r.sanity.eps_sweep for p in r.sanity.eps_sweep.points})
    for eps in sweep:
        rows.append((f"ε sweep {eps:g}: robust accuracy / defended", _sweep_cell(eps)))
    for eps in sweep:
        rows.append((f"ε sweep {eps:g}: defended under the rule attack", _sweep_rule_cell(eps)))
    kinds = dict.fromkeys(o.kind for r in reports for o in r.ood)
    for kind in kinds:
        trained = next(o.trained for r in reports for o in r.ood if o.kind == kind)
        rows.append((f"not clothing: {kind}{'' if trained else ' (held out of training)'}: rejected",
                     _ood_cell(kind)))
    for start, eps in dict.fromkeys((d.start, d.eps) for r in reports for d in r.distal):
        rows.append((f"distal from {start}, ε {eps:g}: accepted (lower is better)", _distal_cell(start, eps)))
    rows += [
        ("uniform-noise images rejected", lambda r: _pct(r.sanity.noise.uniform_reject_rate) if r.sanity.noise
         else "not run"),
        ("constant images (0, 0.1, ..., 1) rejected", lambda r: _pct(r.sanity.noise.constant_reject_rate)
         if r.sanity.noise else "not run"),
        ("check: PGD budget (doubled steps and restarts)", lambda r: _ok(r.sanity.pgd_budget)),
        ("check: accuracy falls with ε", lambda r: _ok(r.sanity.eps_sweep)),
        ("check: Square not stronger than white-box", lambda r: _ok(r.sanity.gradient_free)),
        ("check: attacks on the verdict (budget doubled, gradient-free not stronger)", lambda r: _ok(r.sanity.rule)),
        ("evaluation time (the run that wrote the report: runs read back from its cache count 0)",
         lambda r: f"{r.seconds / 60:.0f} min"),
    ]
    return rows


def _detector_cell(attack: str, score: str) -> Cell:
    def cell(r: Report) -> str:
        for d in r.detectors:
            for s in d.scores:
                if d.attack == attack and s.score == score:
                    return f"{s.auroc:.3f} / {_pct(s.adversarial_catch)}"
        return "—"
    return cell


def _sweep_cell(eps: float) -> Cell:
    def cell(r: Report) -> str:
        pts = [p for p in (r.sanity.eps_sweep.points if r.sanity.eps_sweep else []) if p.eps == eps]
        return f"{_pct(pts[0].robust_accuracy)} / {_pct(pts[0].defended_rate)}" if pts else "—"
    return cell


def _sweep_rule_cell(eps: float) -> Cell:
    def cell(r: Report) -> str:
        pts = [p for p in (r.sanity.eps_sweep.points if r.sanity.eps_sweep else []) if p.eps == eps]
        return _pct(pts[0].rule_defended_rate) if pts else "—"
    return cell


def _ood_cell(kind: str) -> Cell:
    def cell(r: Report) -> str:
        rows = [o for o in r.ood if o.kind == kind]
        return _pct(rows[0].reject_rate) if rows else "—"
    return cell


def _distal_cell(start: str, eps: float) -> Cell:
    def cell(r: Report) -> str:
        rows = [d for d in r.distal if d.start == start and d.eps == eps]
        return _pct(rows[0].accepted_rate) if rows else "—"
    return cell


def _ok(check: Any) -> str:
    if check is None:
        return "not run"
    return "ok" if check.ok else "**failed**"


def render_comparison(reports: list[Report], title: str = "Models side by side") -> str:
    head = [f"{r.model.name} {r.model.version}" for r in reports]
    lines = [f"# {title}\n",
             "Each column is one `python -m training evaluate` report (verdicts by ONNX Runtime on the model's "
             "model.onnx, at its manifest's ρ); *defended* = rejected or correctly classified. Sources: "
             + ", ".join(f"`{r.model.path}` ({r.created_at:%Y-%m-%d})" for r in reports) + ".\n",
             "| | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(reports)]
    lines += [f"| {label} | " + " | ".join(cell(r) for r in reports) + " |" for label, cell in _rows(reports)]
    return "\n".join(lines + _paired(reports)) + "\n"


def _paired(reports: list[Report]) -> list[str]:
    """The first report against each other one, paired on the same images (paired.py)."""
    if len(reports) < 2:
        return []
    first = reports[0]
    lines = ["", "## Paired on the same images (worst case per example)", "",
             "The difference of each rate, first column minus the other, with McNemar's exact test on the "
             "images one model gets right and the other does not, and a 95 % bootstrap interval over images "
             f"({BOOTSTRAP_SAMPLES:,} resamples).", ""]
    for other in reports[1:]:
        for outcome in OUTCOMES:
            pair = f"{first.model.name} {first.model.version} − {other.model.name} {other.model.version}, {outcome}"
            try:
                lines.append(f"- {pair}: {describe(compare_reports(first, other, outcome))}")
            except ValueError as e:
                lines.append(f"- {pair}: no paired test ({e})")
    return lines


def write_comparison(paths: list[Path], out: Path) -> Path:
    reports = []
    for p in paths:
        try:
            reports.append(Report.model_validate_json(Path(p).read_text()))
        except OSError as e:
            raise FileNotFoundError(f"{p}: cannot read the report ({e.strerror})") from None
        except ValueError as e:
            raise ValueError(f"{p} is not an evaluation report: {str(e).splitlines()[0]}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_comparison(reports))
    return out
