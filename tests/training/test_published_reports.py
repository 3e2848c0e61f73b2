"""Every bundled manifest published with an evaluation carries its committed report's figures
(versions are immutable: the report beside a version is the one its manifest was made from)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.manifest import Manifest
from training.evaluation.schema import Report
from training.export import report_mismatches

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = sorted(p for p in (ROOT / "model_store").glob("*/*/manifest.json")
                   if Manifest.model_validate_json(p.read_text()).metrics.worst_case_attacks is not None)


def test_there_are_published_versions_to_check() -> None:
    assert len(PUBLISHED) >= 2


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_manifest_metrics_equal_the_committed_report(path: Path) -> None:
    manifest = Manifest.model_validate_json(path.read_text())
    report_path = ROOT / "docs" / "results" / f"{manifest.name}-{manifest.version}" / "report.json"
    report = Report.model_validate_json(report_path.read_text())
    assert report.model.sha256 == manifest.sha256
    assert report.rho == pytest.approx(manifest.rho, rel=1e-12)
    assert report_mismatches(manifest.metrics, report) == []


def test_a_report_with_another_attack_list_is_a_mismatch() -> None:
    manifest = Manifest.model_validate_json(PUBLISHED[0].read_text())
    report_path = ROOT / "docs" / "results" / f"{manifest.name}-{manifest.version}" / "report.json"
    report = Report.model_validate_json(report_path.read_text())
    report.worst_case.attacks = [*report.worst_case.attacks, "transfer:another"]
    report.worst_case.defended_rate -= 0.01
    differ = report_mismatches(manifest.metrics, report)
    assert any(d.startswith("worst_case_attacks") for d in differ)
    assert any(d.startswith("worst_case_defended_rate") for d in differ)
