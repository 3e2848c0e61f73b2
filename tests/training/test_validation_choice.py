"""training/validation_choice.py and `python -m training choose-on-validation`: kept checkpoints ranked
by their best validation guard check, and the gate a new version must pass to be published."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.validation_choice import guard_best, ranking

ROOT = Path(__file__).resolve().parents[2]


def kept(root: Path, name: str, defended: float, pgd: float) -> Path:
    d = root / name
    d.mkdir()
    best = {"iteration": 100, "defended_rate": defended, "pgd_accuracy": pgd, "clean_accuracy": 0.87}
    (d / "summary.json").write_text(json.dumps({"best": best, "guard": [best]}))
    return d


def test_ranked_by_defended_rate_then_pgd_accuracy(tmp_path: Path) -> None:
    a, b, c = kept(tmp_path, "a", 0.77, 0.75), kept(tmp_path, "b", 0.79, 0.70), kept(tmp_path, "c", 0.77, 0.76)
    assert [g.checkpoint for g in ranking([a, b, c])] == [b, c, a]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="records no best guard check"):
        guard_best(tmp_path / "d")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training", "choose-on-validation", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_publishing_gate(tmp_path: Path) -> None:
    old, better, worse = kept(tmp_path, "old", 0.774, 0.75), kept(tmp_path, "new", 0.779, 0.75), \
        kept(tmp_path, "worse", 0.770, 0.80)
    ok = _cli(str(better), "--must-beat", str(old))
    assert ok.returncode == 0 and "beats" in ok.stdout and "| 77.9 % |" in ok.stdout
    no = _cli(str(worse), "--must-beat", str(old))
    assert no.returncode == 1 and "not published" in no.stdout and "77.0 % vs 77.4 %" in no.stdout
    missing = _cli(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and "Traceback" not in missing.stderr


def test_the_committed_checkpoints_rank() -> None:
    """The criterion on what is committed: each kept rejection-mode checkpoint (those of the served
    versions) has a best guard check under the served rule."""
    kept_dirs = [d for d in sorted((ROOT / "checkpoints").iterdir()) if (d / "summary.json").exists()
                 and "defended_rate" in (json.loads((d / "summary.json").read_text()).get("best") or {})]
    assert kept_dirs and all(0 < g.defended_rate < 1 for g in ranking(kept_dirs))
