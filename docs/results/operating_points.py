"""What a stricter verdict buys and costs, per clean false-reject target: ρ calibrated on the
validation split (as export does, never on test), then on the test split the clean reject rate,
the accuracy on accepted inputs, and the share of the PGD-100 / APGD-CE inputs that fool the
classifier which the verdict rejects (the report's protocol: of the images classified right when
clean; those attacks ignore the rule, so their inputs stand at any ρ; each example's restart best
for the attacker at that ρ is kept). The worst case is not
here: the attacks that know the rule aimed at the manifest's ρ, and another ρ needs its own
evaluation.

    .venv/bin/python docs/results/operating_points.py model_store/fashion-mnist-baseline/3.0.0 \\
        docs/results/fashion-mnist-baseline-3.0.0

The second argument is the version's evaluation folder; its `.cache/` is local (run the evaluation
first). Service side, a ρ is set with DSPHERE_RHO.
"""
import json
import sys
from pathlib import Path

import numpy as np

from app.manifest import MODEL_FILE
from app.model_store import read_manifest
from app.verdict import calibrate_rho_on, geodesic_verdict
from training.data import load_dataset, training_splits
from training.evaluation.cache import AttackCache
from training.evaluation.scoring import Verdicted
from training.judging import OnnxModel

TARGETS = (0.05, 0.10, 0.15, 0.20, 0.25)
FOOLED_ATTACKS = ("pgd-100", "apgd-ce")


def main(version_dir: Path, evaluation: Path) -> None:
    m = read_manifest(version_dir / "manifest.json")
    onnx = OnnxModel(version_dir / MODEL_FILE)
    stats = (m.angle_mean_deg, m.angle_std_deg)
    tc = m.training.training_config
    val = training_splits(m.training.dataset, tc.get("data_dir"), int(tc.get("n_val", 5000)))[1]
    test = load_dataset(m.training.dataset, "test", tc.get("data_dir"))
    val_out, test_out = onnx(val.images), onnx(test.images)
    report = json.loads((evaluation / "report.json").read_text())
    cache = AttackCache(evaluation / ".cache")
    runs = {name: [onnx(cache.read(f)) for f in report["cached_inputs"][name]] for name in FOOLED_ATTACKS}
    y_test = test.labels.numpy()
    y_attacked = y_test[: int(report["n_examples"])]

    print(f"{m.name} {m.version}: clean false-reject target on {len(val.labels)} validation images -> "
          f"test split ({len(y_test)} images); fooled inputs: the first {len(y_attacked)}")
    print("| clean false-reject target (validation) | ρ | clean reject (test) | accuracy on accepted (test) | "
          + " | ".join(f"{a}-fooled rejected" for a in FOOLED_ATTACKS) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in FOOLED_ATTACKS) + " |")
    for target in sorted({m.calibration.target_false_reject_rate, *TARGETS}):
        rho = calibrate_rho_on(*val_out, *stats, target)
        v = geodesic_verdict(*test_out, *stats, rho)
        right = v.labels == y_test
        clean_right = right[: len(y_attacked)]
        cells = [_fooled_rejected(outs, y_attacked, clean_right, stats, rho) for outs in runs.values()]
        served = " (served)" if np.isclose(rho, m.rho) else ""
        print(f"| {target * 100:.0f} %{served} | {rho:.4f} | {_pct(1 - v.accepted.mean())} | "
              f"{_pct(right[v.accepted].mean())} | " + " | ".join(cells) + " |")


def _fooled_rejected(outs: list, y: np.ndarray, clean_right: np.ndarray, stats: tuple, rho: float) -> str:
    """Per example the restart best for the attacker at rho (accepted and wrong, then wrong); of the
    examples classified right when clean that it fools, the share rejected."""
    runs = [Verdicted.of("restart", geodesic_verdict(*out, *stats, rho), y) for out in outs]
    fooled = clean_right & ~np.logical_and.reduce([r.correct for r in runs])
    passed = np.logical_or.reduce([r.broken for r in runs])
    return f"{_pct(1 - passed[fooled].mean())} of {fooled.sum()}"


def _pct(v: float) -> str:
    return f"{v * 100:.1f} %"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
