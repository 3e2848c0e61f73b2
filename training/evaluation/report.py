"""The report of an evaluation (schema.py's `Report`) from what ran, and its files: report.json,
report.md and the figures, each written whole or not at all (training/files.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from training.evaluation.config import EvalConfig
from training.evaluation.loading import WhiteBox
from training.evaluation.runner import AttackRunner
from training.evaluation.schema import Detector, ModelRef, Report, Sanity
from training.evaluation.scoring import Judged, Outcome, rate_fields, worst_case
from training.files import write_atomic

PREFIX_NOTE = "over the examples every attack ran on (a prefix of the evaluation subset)"
ALL_NOTE = ("over all evaluated examples; each counted against the attacks that ran on it (an upper bound on "
            "robustness)")


def build_report(runner: AttackRunner, wb: WhiteBox, clean: Judged, done: list[Judged], *, command: str,
                 checkpoint: str | Path | None, detectors: list[Detector], sanity: Sanity,
                 warnings: list[str]) -> Report:
    """The report: the model, the threat model, the clean rates, every attack's result as the
    runner recorded it, and the worst case per example over `done` (clean and every attack's outcomes)."""
    t, cfg = runner.t, runner.cfg
    cr = rate_fields(clean)
    m = t.manifest
    return Report(
        created_at=datetime.now(UTC), command=command,
        model=ModelRef(name=m.name, version=m.version, sha256=m.sha256, path=str(t.vdir),
                       dataset=m.training.dataset, checkpoint=str(checkpoint) if checkpoint else None,
                       white_box_weights=wb.source, checkpoint_parity_max_abs_diff=wb.parity),  # type: ignore[arg-type]
        eps=t.eps, split=cfg.split, n_examples=len(t.x), rho=t.rule.rho,  # type: ignore[arg-type]  # checked in EvalConfig
        rho_source=_rho_source(cfg),
        angle_mean_deg=list(t.rule.angle_mean_deg), angle_std_deg=list(t.rule.angle_std_deg),
        clean_accuracy=cr["robust_accuracy"], clean_reject_rate=cr["reject_rate"],
        clean_accepted_accuracy=cr["accepted_accuracy"] or 0.0, clean_defended_rate=cr["defended_rate"],
        clean_rho1_reject_rate=cr["rho1_reject_rate"], attacks=runner.results,
        worst_case=worst_case(done, note=PREFIX_NOTE),
        worst_case_all_examples=worst_case(done, n=len(t.x), note=ALL_NOTE),
        detectors=detectors, sanity=sanity, warnings=warnings)


def _rho_source(cfg: EvalConfig) -> str:
    return "manifest" if cfg.rho is None else "override"


def write_outputs(outcome: Outcome, out: Path, figures: bool = True) -> None:
    from training.evaluation.markdown import render_report_markdown

    out.mkdir(parents=True, exist_ok=True)
    if figures:
        from training.evaluation.figures import write_figures

        outcome.report.figures = write_figures(outcome, out)
    write_atomic(out / "report.json", outcome.report.model_dump_json(indent=2) + "\n")
    write_atomic(out / "report.md", render_report_markdown(outcome.report))
