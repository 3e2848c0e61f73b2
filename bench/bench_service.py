"""Load test of the dsphere service with wrk, beside a bare decode-only ceiling.

    python bench/bench_service.py [--duration 5] [--batch-files 8] [--concurrency 1,16,64]

Starts two real uvicorn servers (1 worker each) on 127.0.0.1:
  * `app.main:app`  (the service; bundled model if model_store/fashion-mnist-dsphere exists,
                     else the tiny fixture model of support/fake_store.py)
  * `bench/bare_app.py` (same multipart parsing + image decoding, no model: the ceiling)
then runs wrk (multipart POST via the Lua script of support/loadgen.py) at each concurrency against
/classify, /classify/batch and their bare counterparts, and prints req/s, p50, p99,
the ratio to the ceiling, and non-2xx counts. Nothing is asserted.
Targets: /classify >= 0.6x the ceiling; p99 <= 25 ms at c=16.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from app.model_store import load_version
from support.bundled import BUNDLED_STORE, REPO, bundled_version
from support.bundled import MODEL_NAME as NAME
from support.fake_store import write_version
from support.fashion_mnist import fashion_pngs
from support.loadgen import WrkResult, multipart, run_wrk
from support.server import free_port


def start(target: str, env: dict[str, str], ready_path: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--no-access-log", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + ready_path, timeout=2).status_code in (200, 405):
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{target} did not become ready")


def model_compute(store: Path, batch: int = 16, runs: int = 50) -> float:
    """Microseconds per image of ONNX Runtime alone on the served version, loaded by the
    service's own loader (same session options), at `batch` rows per call: the floor under
    any /classify latency."""
    model = load_version(store, NAME, providers=["CPUExecutionProvider"])
    feed = {model.input_name: np.random.default_rng(0).random((batch, *model.manifest.input.shape), dtype=np.float32)}
    for _ in range(5):
        model.session.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(runs):
        model.session.run(None, feed)
    return (time.perf_counter() - t0) / runs / batch * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--batch-files", type=int, default=8, help="images per /classify/batch request")
    ap.add_argument("--concurrency", default="1,16,64")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (apt-get install wrk)")
    concs = [int(c) for c in args.concurrency.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="dsphere-bench-"))
    try:
        bundled_version()
        store, which = BUNDLED_STORE, "bundled"
    except Exception:
        store, which = tmp / "store", "fixture"
        write_version(store, "1")
    per_image_us = model_compute(store)  # before the servers start, alone on the machine
    imgs = fashion_pngs(max(args.batch_files, 1))
    single, batch = multipart("file", imgs[:1]), multipart("files", imgs[: args.batch_files])

    env = {**os.environ, "DSPHERE_MODEL_STORE": str(store), "DSPHERE_MODEL_NAME": NAME,
           "DSPHERE_QUEUE_SIZE": "1024"}
    svc, svc_url = start("app.main:app", env, "/readyz", [])
    bare, bare_url = start("bare_app:app", dict(os.environ), "/decode", ["--app-dir", "bench"])
    rows: list[tuple[str, int, WrkResult]] = []
    try:
        for label, url, body in [
            ("/classify", svc_url + "/classify", single),
            ("bare /decode", bare_url + "/decode", single),
            (f"/classify/batch x{args.batch_files}", svc_url + "/classify/batch", batch),
            (f"bare /decode/batch x{args.batch_files}", bare_url + "/decode/batch", batch),
        ]:
            run_wrk(url, body, 4, 1)  # warm-up
            for c in concs:
                rows.append((label, c, run_wrk(url, body, c, args.duration)))
    finally:
        for p in (svc, bare):
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    ceiling = {(lbl.replace("bare /decode", "/classify"), c): r.rps for lbl, c, r in rows if lbl.startswith("bare")}
    print(f"\nmodel: {which} ({store}), {os.cpu_count()} CPUs, wrk {args.duration}s per cell, 1 uvicorn worker each")
    print(f"{'endpoint':<28}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x ceiling':>11}{'non-2xx':>9}")
    for label, c, r in rows:
        ceil = None if label.startswith("bare") else ceiling.get((label, c))
        ratio = f"{r.rps / ceil:.2f}" if ceil else ""
        print(f"{label:<28}{c:>5}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{ratio:>11}{r.non_2xx_3xx:>9}")
    print(f"\nONNX Runtime alone on this model: {per_image_us:.0f} us/image at batch 16 (all cores), i.e. at most "
          f"{1e6 / per_image_us:.0f} images/s with nothing else running; the bare ceiling has no model to run.")


if __name__ == "__main__":
    main()
