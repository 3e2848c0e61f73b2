"""training/evaluation/compare.py on the committed reports: one column a model, one row a
measurement, every row present for every model (a dash where a report lacks it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.evaluation.compare import render_comparison, write_comparison
from training.evaluation.paired import compare_reports, describe, mcnemar_exact, paired_test
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


def test_mcnemar_exact_matches_the_binomial_tail() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2**10)  # all ten discordant pairs one way
    assert mcnemar_exact(3, 7) == mcnemar_exact(7, 3) == pytest.approx(2 * (1 + 10 + 45 + 120) / 2**10)
    assert mcnemar_exact(50, 50) == 1.0


def test_paired_test_on_the_same_images() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(1000) < 0.75
    a = b.copy()
    a[np.flatnonzero(~b)[:40]] = True  # a gets 40 more images right, and none fewer
    t = paired_test(a, b, "defended")
    assert (t.only_a, t.only_b, t.n) == (40, 0, 1000) and t.difference == pytest.approx(0.04)
    assert t.p_value < 1e-9 and 0 < t.low <= 0.04 <= t.high
    same = paired_test(b, b, "defended")
    assert (same.p_value, same.low, same.high) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="two equal non-empty vectors"):
        paired_test(a, b[:10], "defended")


def test_comparisons_are_paired_when_the_reports_carry_per_example_outcomes() -> None:
    a, b = (_load(p) for p in REPORTS)
    md = render_comparison([a, b])  # reports made before per-example outcomes were recorded
    assert "no paired test (" in md and "no per-example outcomes" in md
    n = 200
    for r, broken in ((a, "0" * 180 + "1" * 20), (b, "0" * 150 + "1" * 50)):
        r.worst_case = r.worst_case.model_copy(update={"n_examples": n, "broken": broken, "wrong": broken})
        r.split, r.eps = "test", 0.1
    t = compare_reports(a, b, "defended")
    assert (t.rate_a, t.rate_b, t.only_a, t.only_b) == (0.9, 0.75, 30, 0) and t.p_value < 1e-8
    line = next(x for x in render_comparison([a, b]).splitlines() if x.endswith("defended: " + describe(t)))
    assert "+15.0 points" in line and "McNemar exact" in line and "a difference (p < 0.05)" in line
    b.worst_case = b.worst_case.model_copy(update={"n_examples": 100, "broken": "0" * 100, "wrong": "0" * 100})
    with pytest.raises(ValueError, match="not the same images"):
        compare_reports(a, b, "defended")


def test_the_worst_case_records_each_examples_outcome() -> None:
    from training.evaluation.scoring import Verdicted, worst_case

    t = np.array([True, True, False, True])
    clean = Verdicted("clean", correct=t, accepted=np.array([True, True, True, False]))
    pgd = Verdicted("pgd", correct=np.array([False, True, False, True]), accepted=np.array([True, False, True, True]))
    wc = worst_case([clean, pgd])
    # example 0: pgd made it wrong and accepted; 2: wrong and accepted already clean; 1, 3: defended
    assert (wc.broken, wc.wrong) == ("1010", "1010") and wc.defended_rate == 0.5
