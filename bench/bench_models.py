"""The served models' cost per image on every inference path this machine has, side by side in one run.

    python bench/bench_models.py [--store model_store] [--models fashion-mnist-dsphere,fashion-mnist-baseline]
                                 [--runs 300] [--blocks 5] [--threads 2] [--batches 1,16,64]

Paths: ONNX Runtime fp32 (the reference, as the service loads it), OpenVINO fp32 and OpenVINO bf16
(app/runtimes.py; a path this CPU or the installed packages lack is listed as skipped, with why).
Each model's latest version is timed on real Fashion-MNIST test images; the (model, path) cells
alternate in blocks so that load drift hits every cell alike. Prints the median µs per image, the
ratio of each cell to the reference model's ONNX Runtime fp32 at the same batch size (the unit),
and ONNX Runtime's optimized graph of each model (nodes, layout reorders), read back through
`SessionOptions.optimized_model_filepath`. Nothing is asserted; run it on a quiet machine.
Targets (docs/SERVING.md): the D-SphereNet's fp32 graph <= 1.15x the baseline at batch 16; its
fastest path <= 0.5x at batch 16 and <= 1.0x at batch 1.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable
from pathlib import Path

import numpy as np
from timing import per_image_us

from app.manifest import MODEL_FILE, REFERENCE
from app.model_store import ModelStoreError, find_version, load_version
from app.runtimes import RuntimeUnavailable, cpu_features, cpu_name, openvino_runner
from support.bundled import BUNDLED_STORE
from support.fashion_mnist import load_fashion_mnist_test
from support.ort_graph import optimized_graph_counts

PATHS = ("onnxruntime-fp32", "openvino-fp32", "openvino-bf16")
Run = Callable[[np.ndarray], object]


def runs_of(store: Path, name: str, version: str, threads: int) -> tuple[str, dict[str, Run], dict[str, str]]:
    """(version, path -> run, path -> why skipped) of `version` of `name`."""
    model = load_version(store, name, version, providers=["CPUExecutionProvider"], intra_op_threads=threads)
    runs: dict[str, Run] = {"-".join(REFERENCE): model.runner}
    skipped: dict[str, str] = {}
    model_bytes = (model.path / MODEL_FILE).read_bytes()
    for path in PATHS[1:]:
        try:
            runs[path] = openvino_runner(model_bytes, path.split("-")[1], threads)
        except RuntimeUnavailable as e:
            skipped[path] = str(e)
    return model.version, runs, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=BUNDLED_STORE)
    ap.add_argument("--models", default="fashion-mnist-dsphere,fashion-mnist-baseline",
                    help="comma-separated NAME (its latest version) or NAME@VERSION")
    ap.add_argument("--runs", type=int, default=300, help="timed calls per cell and batch size")
    ap.add_argument("--blocks", type=int, default=5, help="alternating blocks the runs are split into")
    ap.add_argument("--threads", type=int, default=2, help="inference threads")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--reference", default="fashion-mnist-baseline", help="the model whose fp32 ONNX Runtime is 1x")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    cells: dict[tuple[str, str], Run] = {}
    versions: dict[str, str] = {}
    for spec in (n.strip() for n in args.models.split(",") if n.strip()):
        name, _, version = spec.partition("@")
        try:
            version, runs, skipped = runs_of(args.store, name, version or "latest", args.threads)
            name = spec if "@" in spec else name
            versions[name] = version
        except ModelStoreError as e:
            print(f"skipped {name}: {e}")
            continue
        cells.update({(name, path): run for path, run in runs.items()})
        for path, why in skipped.items():
            print(f"skipped {name} {path}: {why}")
    if not cells:
        raise SystemExit("error: none of the models is in the store")
    images = (load_fashion_mnist_test(max(batches)).astype(np.float32) / 255.0)[:, None]  # (N, 1, 28, 28)
    times: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)
    per_block = max(1, args.runs // args.blocks)
    for _ in range(args.blocks):
        for b in batches:
            for (name, path), run in cells.items():
                calls = max(10, per_block * 16 // b)  # about as many images per cell at every batch size
                times[name, path, b] += per_image_us(run, np.ascontiguousarray(images[:b]), calls)

    unit = (args.reference if args.reference in versions else next(iter(versions)), "-".join(REFERENCE))
    print(f"\n{cpu_name()} ({', '.join(cpu_features())}), {args.threads} threads; median µs per image; "
          f"ratio to {unit[0]} {unit[1]} at the same batch size")
    print(f"| model | version | path | {' | '.join(f'batch {b}' for b in batches)} | "
          f"{' | '.join(f'x at {b}' for b in batches)} |")
    print("| --- | --- | --- |" + " --- |" * (2 * len(batches)))
    for name, path in cells:
        med = [float(np.median(times[name, path, b])) for b in batches]
        ref = [float(np.median(times[*unit, b])) for b in batches]
        print(f"| {name.partition('@')[0]} | {versions[name]} | {path} | {' | '.join(f'{m:.0f}' for m in med)} | "
              f"{' | '.join(f'{m / r:.2f}x' for m, r in zip(med, ref, strict=True))} |")

    print("\nONNX Runtime's optimized graph (this CPU):\n| model | version | nodes | reorders |\n"
          "| --- | --- | --- | --- |")
    for name, version in versions.items():
        bare = name.partition("@")[0]
        vdir = args.store / bare / find_version(args.store, bare, version)
        nodes, reorders = optimized_graph_counts(vdir / MODEL_FILE, args.threads)
        print(f"| {bare} | {version} | {nodes} | {reorders} |")


if __name__ == "__main__":
    main()
