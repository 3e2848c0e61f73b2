"""bench/attack_service.py for real: ART's Square through the V2 API of a live server, detector off and on.

One image, 300 queries: the run files say the detector (reject) saw the attack within a few queries
and that nothing of it happens with the detector off; a second invocation resumes (attacks nothing
again). The score vector the attack is given is checked against the rule it encodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from support.api_classifier import Ledger, decision_vector, margin, score_vector
from support.bundled import REPO


def _harness(out: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(REPO / "bench" / "attack_service.py"), "--out", str(out), *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_square_through_the_api_detected_on_not_off(tmp_path: Path) -> None:
    args = ("--images", "1", "--queries", "300", "--attacks", "square")
    _harness(tmp_path, *args)
    off = json.loads((tmp_path / "attacks" / "square-off-n1-q300.json").read_text())
    on = json.loads((tmp_path / "attacks" / "square-on-n1-q300.json").read_text())
    assert off["complete"] and on["complete"]
    # the version the published results were measured on, not the store's latest
    assert off["config"]["model"] == on["config"]["model"] == "fashion-mnist-dsphere 3.1.0"
    (r_off,), (r_on,) = off["records"], on["records"]
    assert 250 <= r_off["queries"] <= 300 and 250 <= r_on["queries"] <= 300  # the budget, spent
    assert r_off["detections"] == 0 and not r_off["detected"]
    assert r_on["detected"] and r_on["queries_to_detection"] <= 10
    assert r_on["detections"] > r_on["queries"] // 2  # once seen, the attack stays seen
    assert on["sessions"][-1]["detector_health"]["status"] == "ok"
    assert off["sessions"][-1]["detector_health"]["action"] == "off"
    assert "| square | 1 x 300 |" in (tmp_path / "table.md").read_text()
    # a finished run is not attacked again
    assert "complete (1 images)" in _harness(tmp_path, *args)


def test_score_vector_encodes_the_served_rule() -> None:
    y = 3
    correct = margin(3, True, "", 0.9, 20.0, 40.0, y)
    wrong_rejected_far = margin(5, False, "angle", 0.6, 70.0, 40.0, y)
    wrong_rejected_near = margin(5, False, "angle", 0.6, 41.0, 40.0, y)
    wrong_accepted = margin(5, True, "", 0.6, 30.0, 40.0, y)
    detected = margin(5, True, "query_history", 0.6, 30.0, 40.0, y)
    assert detected > correct > wrong_rejected_far > wrong_rejected_near > 0 > wrong_accepted
    withheld = margin(-1, False, "query_history", float("nan"), float("nan"), float("nan"), 9)
    assert withheld == detected
    for m, label, true in ((correct, 3, y), (wrong_rejected_near, 5, y), (detected, 5, y), (withheld, -1, 9)):
        v = score_vector(m, label, true)
        assert v.argmax() == true and abs(v.sum() - 1) < 1e-5
    v = score_vector(wrong_accepted, 5, y)
    assert v.argmax() == 5 and abs(v.sum() - 1) < 1e-5
    assert decision_vector(5, True, y).argmax() == 5 and decision_vector(5, False, y).argmax() == y


def test_ledger_counts_success_only_within_eps() -> None:
    x0 = np.zeros((1, 28, 28), np.float32)
    L = Ledger(0, x0, 3, budget=10)
    L.record(x0 + 0.2, (5, True, "", 0.6, 30.0, 40.0))  # accepted and wrong, but outside eps
    L.record(x0 + 0.05, (3, False, "query_history", 0.6, 30.0, 40.0))
    L.record(x0 + 0.1, (5, True, "", 0.6, 30.0, 40.0))
    assert (L.sent, L.first_detection, L.success_at, L.adversarial) == (3, 2, 3, 2)
