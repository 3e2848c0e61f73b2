"""How the serving form of the sphere graph was chosen: the candidate exports of one SphereConv2d
network, side by side (docs/SERVING.md, "The sphere graph").

    python bench/graph_forms.py [--version-dir model_store/fashion-mnist-dsphere/3.0.0] [--runs 200]

Rebuilds the D-SphereNet from a version's model.onnx, exports it in each form below (every one the
same function: the max |Δ| to PyTorch is printed), and prints ONNX Runtime's optimized graph
(nodes, layout reorders) and the median µs per image at batch 1 and 16, ONNX Runtime fp32 and
OpenVINO bf16 (where this CPU has it), the forms interleaved. Nothing is asserted; run it on a
quiet machine. Needs the `train` extra (torch).

Forms (per SphereConv2d + ReLU; see training/serving_graph.py for the one exported):
  trained      training/layers.py as is (the one-channel norm map multiplies the output)
  serving      the factor on the one-channel map, broadcast back by a 1x1 conv of ones (exported)
  broadcast    the factor on the one-channel map, multiplied with numpy broadcasting
  to-channels  Σ_c x² by a 1x1 all-ones conv to every output channel, the rest full size
  full-ones    ‖patch‖² by a 3x3 all-ones conv to every output channel
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from timing import per_image_us
from torch import Tensor

from app.runtimes import RuntimeUnavailable, openvino_runner
from support.fashion_mnist import load_fashion_mnist_test
from support.ort_graph import optimized_graph_counts
from training.layers import SphereConv2d
from training.onnx_weights import model_from_onnx
from training.serving_graph import ServingGraph, SphereConvForm, _normalized_kernels, sphere_conv


def _truncated(y: Tensor, sq: Tensor) -> Tensor:
    return torch.relu(y) / torch.clamp(torch.sqrt(sq), min=1.0)


def to_channels(layer: SphereConv2d, x: Tensor, relu: bool) -> Tensor:
    s = F.conv2d(x * x, torch.full((layer.out_channels, layer.in_channels, 1, 1), 9.0))
    sq = F.avg_pool2d(s, 3, 1, 1, count_include_pad=True)
    return _truncated(F.conv2d(x, _normalized_kernels(layer), None, 1, 1), sq)


def full_ones(layer: SphereConv2d, x: Tensor, relu: bool) -> Tensor:
    sq = F.conv2d(x * x, torch.ones(layer.out_channels, layer.in_channels, 3, 3), None, 1, 1)
    return _truncated(F.conv2d(x, _normalized_kernels(layer), None, 1, 1), sq)


def broadcast(layer: SphereConv2d, x: Tensor, relu: bool) -> Tensor:
    s = F.conv2d(x * x, torch.full((1, layer.in_channels, 1, 1), 9.0))
    sq = F.avg_pool2d(s, 3, 1, 1, count_include_pad=True)
    return _truncated(F.conv2d(x, _normalized_kernels(layer), None, 1, 1), sq)


# each a (layer, x, relu) -> relu(layer(x)) form for ServingGraph (the paper's nets: every sphere conv
# is followed by a relu); None: the model as trained
FORMS: dict[str, SphereConvForm | None] = {"trained": None, "serving": sphere_conv, "broadcast": broadcast,
                                           "to-channels": to_channels, "full-ones": full_ones}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version-dir", type=Path, default=Path("model_store/fashion-mnist-dsphere/3.0.0"))
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    manifest = json.loads((args.version_dir / "manifest.json").read_text())
    model = model_from_onnx(args.version_dir / "model.onnx", manifest["training"]["model_config"]).eval()
    x = torch.from_numpy((load_fashion_mnist_test(64).astype(np.float32) / 255.0)[:, None])
    with torch.no_grad():
        ref = model(x)
    runs: dict[tuple[str, str], Callable[[np.ndarray], object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, form in FORMS.items():
            path = Path(tmp) / f"{name}.onnx"
            graph = model if form is None else ServingGraph(model, form)
            torch.onnx.export(graph.eval(), (x[:2],), str(path), input_names=["input"],
                              output_names=["logits", "cosines"], opset_version=17, dynamo=False,
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}, "cosines": {0: "N"}})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            out = session.run(None, {"input": x.numpy()})
            diff = max(float(np.abs(out[k] - ref[k].numpy()).max()) for k in (0, 1))
            nodes, reorders = optimized_graph_counts(path)
            print(f"{name:12s} max |Δ| to PyTorch {diff:.1e}, optimized graph {nodes} nodes, {reorders} reorders")
            runs[name, "onnxruntime-fp32"] = lambda a, s=session: s.run(None, {"input": a})
            try:
                runs[name, "openvino-bf16"] = openvino_runner(path.read_bytes(), "bf16", args.threads)
            except RuntimeUnavailable as e:
                print(f"  openvino-bf16 skipped: {e}")
        times: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)
        for _ in range(5):
            for b in (1, 16):
                xb = np.ascontiguousarray(x[:b].numpy())
                for key, run in runs.items():
                    calls = max(10, args.runs // 5 if b == 1 else args.runs // 20)
                    times[*key, b] += per_image_us(run, xb, calls, warmup=5)
    print("\n| form | path | µs batch 1 | µs batch 16 |\n| --- | --- | --- | --- |")
    for name, path in runs:
        print(f"| {name} | {path} | {np.median(times[name, path, 1]):.0f} | {np.median(times[name, path, 16]):.0f} |")


if __name__ == "__main__":
    main()
