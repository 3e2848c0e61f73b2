"""Why the service offers no int8 path: ONNX Runtime static quantization of the served models, measured.

    python bench/int8_trial.py [--store model_store] [--threads 2] [--runs 200]

Each model's latest model.onnx is quantized by ONNX Runtime (QDQ, per-channel int8 weights, uint8
activations, Conv/MatMul/Gemm), calibrated on 1,000 validation-like images (test images 9,000-9,999,
never those scored), then run by ONNX Runtime (VNNI kernels where the CPU has them) and by OpenVINO
(which reads the QDQ graph as int8). Prints label and verdict agreement with the fp32 reference on
the first 5,000 test images and the µs per image at batch 1 and 16 beside fp32. Nothing is
asserted; docs/SERVING.md reports a run. Needs the `train` extra (onnx).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from timing import per_image_us

from app.manifest import MODEL_FILE
from app.model_store import find_version, read_manifest
from app.runtimes import openvino_runner
from app.verdict import geodesic_verdict
from support.bundled import BUNDLED_STORE
from support.fashion_mnist import load_fashion_mnist_test


class Images(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int = 50) -> None:
        self.batches = iter([{"input": x[i: i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=BUNDLED_STORE)
    ap.add_argument("--models", default="fashion-mnist-dsphere,fashion-mnist-baseline")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    images = (load_fashion_mnist_test(10_000).astype(np.float32) / 255.0)[:, None]
    scored, calibration = images[:5000], images[9000:]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    print("| model | version | path | label agreement | verdict agreement | µs batch 1 | µs batch 16 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        vdir = args.store / name / find_version(args.store, name)
        manifest = read_manifest(vdir / "manifest.json")
        with tempfile.TemporaryDirectory() as tmp:
            pre, q8 = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
            quant_pre_process(str(vdir / MODEL_FILE), str(pre))
            quantize_static(str(pre), str(q8), Images(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"])
            fp32 = ort.InferenceSession(str(vdir / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
            paths = {
                "onnxruntime-fp32": lambda x, s=fp32: s.run(None, {"input": x}),
                "onnxruntime-int8": lambda x, s=ort.InferenceSession(str(q8), opts, providers=[
                    "CPUExecutionProvider"]): s.run(None, {"input": x}),
                "openvino-int8": openvino_runner(q8.read_bytes(), "fp32", args.threads),
            }
            ref = None
            for path, run in paths.items():
                out = [run(np.ascontiguousarray(scored[i: i + 500])) for i in range(0, len(scored), 500)]
                logits, cosines = (np.concatenate([o[k] for o in out]).astype(np.float64) for k in (0, 1))
                v = geodesic_verdict(logits, cosines, manifest.angle_mean_deg, manifest.angle_std_deg, manifest.rho)
                ref = ref or v
                t1, t16 = (float(np.median(per_image_us(run, np.ascontiguousarray(images[:b]),
                                                        max(10, args.runs // b)))) for b in (1, 16))
                print(f"| {name} | {manifest.version} | {path} | {(v.labels == ref.labels).mean():.4f} | "
                      f"{(v.accepted == ref.accepted).mean():.4f} | {t1:.0f} | {t16:.0f} |")


if __name__ == "__main__":
    main()
