"""`python -m training precision` measures a path only from a report of the version's very
model.onnx, on the test split, at the manifest's rho, and reads only the cache files that report
lists (training/precision.py): a stale file beside them is never judged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from app.model_store import read_manifest
from support.fake_store import NAME, write_version
from training.precision import PrecisionError, cached_attacks, evaluation_inputs, measure


@pytest.fixture
def version_dir(tmp_path: Path) -> Path:
    write_version(tmp_path / "store", "1")
    return tmp_path / "store" / NAME / "1"


def _report(version_dir: Path, **changes: Any) -> dict[str, Any]:
    manifest = read_manifest(version_dir / "manifest.json")
    report: dict[str, Any] = {"model": {"name": NAME, "version": "1", "sha256": manifest.sha256}, "split": "test",
                              "rho": manifest.rho, "eps": 0.1, "worst_case": {"n_examples": 2, "attacks": ["clean"]},
                              "cached_inputs": {}}
    report.update(changes)
    return report


def _measure(version_dir: Path, report_dir: Path, report: dict[str, Any]) -> None:
    report_dir.mkdir(exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report))
    measure(version_dir, report_dir, "openvino", "bf16", 1, 10, 2, say=lambda _: None)


@pytest.mark.parametrize("changes, why", [
    ({"model": {"name": NAME, "version": "1"}}, "names no model sha256"),
    ({"model": {"name": NAME, "version": "1", "sha256": "0" * 64}}, "judged another model.onnx"),
    ({"split": "validation"}, "attacked the validation split, not the test split"),
    ({"rho": 1.5}, "judged at rho 1.5, not the manifest's"),
])  # fmt: skip
def test_a_report_of_another_model_split_or_rho_is_refused(version_dir: Path, tmp_path: Path,
                                                            changes: dict[str, Any], why: str) -> None:
    with pytest.raises(PrecisionError, match=why):
        _measure(version_dir, tmp_path / "eval", _report(version_dir, **changes))


def test_a_borderline_floor_below_the_contract_cannot_be_stated(version_dir: Path, tmp_path: Path) -> None:
    report_dir = tmp_path / "eval"
    report_dir.mkdir()
    (report_dir / "report.json").write_text(json.dumps(_report(version_dir)))
    with pytest.raises(PrecisionError, match="borderline floor below the contract"):
        measure(version_dir, report_dir, "openvino", "bf16", 1, 10, 2, say=lambda _: None, borderline_floor=0.5)


def test_only_the_cache_files_the_report_lists_are_read(tmp_path: Path) -> None:
    cache = tmp_path / ".cache"
    cache.mkdir()
    kept = {name: torch.full((2, 1, 28, 28), float(i)) for i, name in enumerate(("pgd-100-aaaa", "pgd-100-bbbb"))}
    for name, x in kept.items():
        save_file({"x_adv": x}, str(cache / f"{name}.safetensors"))
    save_file({"x_adv": torch.full((2, 1, 28, 28), 9.0)}, str(cache / "pgd-100-0123456789abcdef0123.safetensors"))
    (cache / "rule-0123456789abcdef0123.safetensors").write_bytes(b"stale and unreadable")
    report = {"cached_inputs": {"pgd-100": ["pgd-100-aaaa.safetensors", "pgd-100-bbbb.safetensors"],
                                "transfer:baseline": []},
              "worst_case": {"attacks": ["clean", "pgd-100", "rule", "transfer:baseline"]}}
    inputs, not_judged, every = evaluation_inputs(tmp_path, report)
    assert list(inputs) == ["pgd-100"] and [float(t[0, 0, 0, 0]) for t in inputs["pgd-100"]] == [0.0, 1.0]
    assert not_judged == ["rule", "transfer:baseline"] and len(every) == 2


def test_a_report_without_its_cache_list_or_with_a_listed_file_missing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PrecisionError, match="lists no cache files"):
        cached_attacks(tmp_path, {"worst_case": {"attacks": []}})
    with pytest.raises(PrecisionError, match=r"pgd-100-gone\.safetensors, listed in .* is missing"):
        cached_attacks(tmp_path, {"cached_inputs": {"pgd-100": ["pgd-100-gone.safetensors"]}})
