"""Worst case per example over the first N test images, from an evaluation's attack cache (its
`.cache/` is local: run the evaluation first), judged as the service would (ONNX Runtime, the
manifest's rule). Puts two models evaluated on different n side by side on the same images:

    .venv/bin/python docs/results/worst_case_prefix.py model_store/fashion-mnist-dsphere/3.0.0 \\
        docs/results/fashion-mnist-dsphere-3.0.0 300
"""
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from app.verdict import geodesic_verdict
from training.data import load_dataset
from training.judging import OnnxModel

vdir, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
m = json.loads((vdir / "manifest.json").read_text())
onnx = OnnxModel(vdir / "model.onnx")
test = load_dataset("fashion-mnist", "test")
y = test.labels[:n].numpy()
def verdict(x):
    lg, cs = onnx(x)
    v = geodesic_verdict(lg, cs, m["angle_mean_deg"], m["angle_std_deg"], m["rho"])
    return v.labels == y, v.accepted
c, a = verdict(test.images[:n])
wrong, broken = ~c, a & ~c
files = sorted(p for p in (out / ".cache").glob("*.safetensors") if not p.name.startswith("adaptive-"))
for p in files:
    x = load_file(str(p))["x_adv"][:n]
    cc, aa = verdict(x)
    wrong |= ~cc
    broken |= aa & ~cc
print(f"first {n}: {len(files)} cached attack runs: worst case robust {100 * (1 - wrong.mean()):.1f} %, "
      f"defended {100 * (1 - broken.mean()):.1f} %")
