"""ONNX Runtime's cost per image of the served models, side by side, in one run.

    python bench/bench_models.py [--store model_store] [--models fashion-mnist-dsphere,fashion-mnist-baseline]
                                 [--runs 200] [--threads 2]

Each model's latest version is loaded by the service's own loader (`app.model_store.load_version`,
the same session options), then timed on real Fashion-MNIST test images at batch 1 and batch 16,
the model blocks alternating so that load drift hits every model alike. Prints the median
microseconds per image and each model's ratio to the reference (the baseline). Nothing is asserted.
Targets: the D-SphereNet <= 1.3x the baseline at batch 16, <= 1.5x at batch 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from app.model_store import ModelStoreError, load_version
from support.bundled import BUNDLED_STORE
from support.fashion_mnist import load_fashion_mnist_test

BATCHES = (1, 16)


def per_image_us(model, x: np.ndarray, runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    """`runs` timed calls on x (after 10 warm-up calls): microseconds per image of each."""
    feed = {model.input_name: x}
    for _ in range(10):
        model.session.run(None, feed)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.session.run(None, feed)
        out.append((time.perf_counter() - t0) * 1e6 / len(x))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=BUNDLED_STORE)
    ap.add_argument("--models", default="fashion-mnist-dsphere,fashion-mnist-baseline")
    ap.add_argument("--runs", type=int, default=200, help="timed calls per model and batch size")
    ap.add_argument("--blocks", type=int, default=5, help="alternating blocks the runs are split into")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--reference", default="fashion-mnist-baseline", help="the model ratios are taken to")
    args = ap.parse_args()

    models = {}
    for name in (n.strip() for n in args.models.split(",") if n.strip()):
        try:
            models[name] = load_version(args.store, name, providers=["CPUExecutionProvider"],
                                        intra_op_threads=args.threads)
        except ModelStoreError as e:
            print(f"skipped {name}: {e}")
    if not models:
        raise SystemExit("error: none of the models is in the store")
    images = (load_fashion_mnist_test(max(BATCHES)).astype(np.float32) / 255.0)[:, None]  # (N, 1, 28, 28)
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in models for b in BATCHES}
    per_block = max(1, args.runs // args.blocks)
    for _ in range(args.blocks):
        for b in BATCHES:
            for name, model in models.items():
                times[name, b] += per_image_us(model, images[:b], per_block)

    first = args.reference if args.reference in models else next(iter(models))
    print(f"ONNX Runtime, {args.threads} threads, median µs per image over {args.blocks * per_block} calls")
    print(f"| model | version | {' | '.join(f'batch {b}' for b in BATCHES)} | "
          f"{' | '.join(f'ratio to {first} at {b}' for b in BATCHES)} |")
    print("| --- | --- |" + " --- |" * (2 * len(BATCHES)))
    for name, model in models.items():
        med = [float(np.median(times[name, b])) for b in BATCHES]
        ref = [float(np.median(times[first, b])) for b in BATCHES]
        print(f"| {name} | {model.version} | {' | '.join(f'{m:.0f}' for m in med)} | "
              f"{' | '.join(f'{m / r:.2f}x' for m, r in zip(med, ref, strict=True))} |")


if __name__ == "__main__":
    main()
