"""training/evaluation/compare.py on the committed reports: one column a model, one row a
measurement, every row present for every model (a dash where a report lacks it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.evaluation.compare import render_comparison, write_comparison
from training.evaluation.schema import OodResult, Report

ROOT = Path(__file__).resolve().parents[2]
REPORTS = [ROOT / "docs/results/fashion-mnist-dsphere-2.0.0/report.json",
           ROOT / "docs/results/fashion-mnist-baseline-1.0.0/report.json"]


def _load(p: Path) -> Report:
    return Report.model_validate_json(p.read_text())


def test_rows_read_side_by_side() -> None:
    a, b = (_load(p) for p in REPORTS)
    md = render_comparison([a, b])
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == f"| | {a.model.name} {a.model.version} | {b.model.name} {b.model.version} |"
    assert all(line.count(" | ") == 2 for line in rows[2:])  # label + two cells on every row
    wc = next(line for line in rows if line.startswith("| **worst case per example: defended**"))
    assert f"{100 * a.worst_case.defended_rate:.1f} %" in wc and f"{100 * b.worst_case.defended_rate:.1f} %" in wc


def test_a_row_one_report_lacks_gets_a_dash() -> None:
    a, b = (_load(p) for p in REPORTS)
    a.ood = [OodResult(kind="gratings", trained=False, n_examples=10, reject_rate=0.9)]
    md = render_comparison([a, b])
    row = next(line for line in md.splitlines() if "gratings (held out of training)" in line)
    assert row.endswith("| 90.0 % | — |")


def test_write_comparison_says_which_file_is_not_a_report(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="is not an evaluation report"):
        write_comparison([REPORTS[0], bad], tmp_path / "out.md")
    with pytest.raises(FileNotFoundError):
        write_comparison([tmp_path / "missing.json"], tmp_path / "out.md")
    assert write_comparison(REPORTS, tmp_path / "out.md").read_text().startswith("# Models side by side")


def test_an_attack_several_reports_share_is_one_row() -> None:
    reports = [_load(REPORTS[0]), _load(REPORTS[1]), _load(REPORTS[1])]
    md = render_comparison(reports)
    assert sum(line.startswith("| adaptive: defended |") for line in md.splitlines()) == 1
