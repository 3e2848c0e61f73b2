"""Load test of the dsphere service with wrk, beside a bare decode-only ceiling.

    python bench/bench_service.py [--duration 5] [--batch-files 8] [--concurrency 1,16,64]
                                  [--model fashion-mnist-dsphere] [--precisions fp32,bf16]

Starts real uvicorn servers (1 worker each) on 127.0.0.1:
  * `app.main:app`  once per precision (DSPHERE_PRECISION; bf16 runs on OpenVINO where this CPU
                     and the version's precision record allow, the log and /healthz say which
                     path runs); the bundled model if model_store/MODEL exists, else the tiny
                     fixture model of support/fake_store.py
  * `bench/bare_app.py` (same multipart parsing + image decoding, no model: the ceiling)
then runs wrk (multipart POST via the Lua script of support/loadgen.py) at each concurrency against
/classify, /classify/batch and their bare counterparts, and prints req/s, p50, p99,
the ratio to the ceiling, and non-2xx counts. Nothing is asserted.
Targets: /classify >= 0.8x the ceiling and p99 <= 20 ms at c=16 on the fastest path.
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
from timing import per_image_us

from app.model_store import load_version
from app.settings import load_settings
from support.bundled import BUNDLED_STORE, REPO
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


def model_compute(store: Path, name: str, precision: str, batch: int = 16, runs: int = 50) -> tuple[str, float]:
    """(path, microseconds per image) of the served version's runner alone, loaded by the service's
    own loader, at `batch` rows per call: the floor under any /classify latency."""
    settings = load_settings(precision=precision)  # the service's own choice of backend
    model = load_version(store, name, providers=["CPUExecutionProvider"], backend=settings.runtime_backend,
                         precision=precision)
    x = np.random.default_rng(0).random((batch, *model.manifest.input.shape), dtype=np.float32)
    return model.runner.info.path, float(np.mean(per_image_us(model.runner, x, runs, warmup=5)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--batch-files", type=int, default=8, help="images per /classify/batch request")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--model", default=NAME, help="model of the bundled store to serve")
    ap.add_argument("--precisions", default="fp32,bf16", help="DSPHERE_PRECISION values, one server each")
    ap.add_argument("--threads", type=int, default=0, help="DSPHERE_INTRA_OP_THREADS (0: the runtime's default)")
    args = ap.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (apt-get install wrk)")
    concs = [int(c) for c in args.concurrency.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="dsphere-bench-"))
    name = args.model
    if (BUNDLED_STORE / name).is_dir():
        store, which = BUNDLED_STORE, "bundled"
    else:
        store, which, name = tmp / "store", "fixture", NAME
        write_version(store, "1")
    # before the servers start, alone on the machine
    compute = {p: model_compute(store, name, p) for p in precisions}
    imgs = fashion_pngs(max(args.batch_files, 1))
    single, batch = multipart("file", imgs[:1]), multipart("files", imgs[: args.batch_files])

    bare, bare_url = start("bare_app:app", dict(os.environ), "/decode", ["--app-dir", "bench"])
    rows: list[tuple[str, int, WrkResult]] = []
    try:
        for label, url, body in [("bare /decode", bare_url + "/decode", single),
                                 (f"bare /decode/batch x{args.batch_files}", bare_url + "/decode/batch", batch)]:
            rows += measure(label, url, body, concs, args.duration)
        for precision in precisions:
            env = {**os.environ, "DSPHERE_MODEL_STORE": str(store), "DSPHERE_MODEL_NAME": name,
                   "DSPHERE_QUEUE_SIZE": "1024", "DSPHERE_PRECISION": precision,
                   "DSPHERE_INTRA_OP_THREADS": str(args.threads)}
            svc, svc_url = start("app.main:app", env, "/readyz", [])
            try:
                runtime = httpx.get(svc_url + "/healthz", timeout=5).json()["runtime"]
                path = f"{runtime['backend']}-{runtime['precision']}"
                rows += measure(f"/classify [{path}]", svc_url + "/classify", single, concs, args.duration)
                rows += measure(f"/classify/batch x{args.batch_files} [{path}]", svc_url + "/classify/batch", batch,
                                concs, args.duration)
            finally:
                svc.terminate()
                svc.wait(timeout=30)
    finally:
        bare.terminate()
        bare.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    ceiling = {(lbl.removeprefix("bare /decode"), c): r.rps for lbl, c, r in rows if lbl.startswith("bare")}
    print(f"\nmodel: {which} {name} ({store}), {os.cpu_count()} CPUs, wrk {args.duration}s per cell, "
          f"1 uvicorn worker each, DSPHERE_INTRA_OP_THREADS={args.threads}")
    print("| endpoint | connections | req/s | p50 ms | p99 ms | x bare | non-2xx |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for label, c, r in rows:
        kind = label.split(" [")[0].removeprefix("/classify")
        ceil = None if label.startswith("bare") else ceiling.get((kind, c))
        ratio = f"{r.rps / ceil:.2f}" if ceil else ""
        print(f"| {label} | {c} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {ratio} | {r.non_2xx_3xx} |")
    for precision, (path, us) in compute.items():
        print(f"\nDSPHERE_PRECISION={precision} runs {path}: {us:.0f} us/image alone at batch 16, i.e. at most "
              f"{1e6 / us:.0f} images/s with nothing else running; the bare ceiling has no model to run.")


def measure(label: str, url: str, body: bytes, concs: list[int], duration: int
            ) -> list[tuple[str, int, WrkResult]]:
    """wrk at each concurrency after a short warm-up."""
    run_wrk(url, body, 4, 1)
    return [(label, c, run_wrk(url, body, c, duration)) for c in concs]


if __name__ == "__main__":
    main()
