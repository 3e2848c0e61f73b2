"""Load test of the dsphere service with wrk, beside a bare decode-only ceiling, in one run.

    python bench/bench_service.py [--duration 5] [--concurrency 1,16,64] [--servers 1x0,1x0-off,default]
                                  [--model fashion-mnist-dsphere] [--precisions fp32] [--batch-files 0]

For the tiny fixture model of support/fake_store.py (about 1 us an image: the service's own work)
and for the served model of the bundled store (MODEL), it starts each server of `--servers`:
  * `WxT`      W uvicorn workers of T inference threads (DSPHERE_INTRA_OP_THREADS, 0: the runtime's
               default); W > 1 runs under gunicorn -c gunicorn.conf.py with DSPHERE_WORKERS=W
  * `default`  what the image and `make serve` run: gunicorn -c gunicorn.conf.py as it stands
               (DSPHERE_WORKERS and its inference threads, /metrics over the workers)
  * a `-off` suffix: the same with the query-history detector off (DSPHERE_QUERY_HISTORY_ACTION=off),
               to show what the detector costs
each on 127.0.0.1 with the query-history detector on (its default, "reject"), and beside them
`bench/bare_app.py` (one uvicorn worker: the same multipart parsing and image decoding, no model:
the ceiling). wrk (the Lua script of support/loadgen.py) POSTs /classify at each concurrency,
rotating through 60,000 distinct Fashion-MNIST training images (each server starts with an empty
history and sees every image once at most: the exact-repeat cache answers none). Prints req/s,
p50, p99, the ratio to the bare endpoint at the same concurrency, the non-2xx count, and the load
average before and after. Nothing is asserted (the figures and targets: docs/SERVING.md, "Workers").
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
from support.loadgen import WrkResult, distinct_bodies, multipart, run_wrk
from support.server import free_port

DISTINCT = 60_000
WARMUP = 2_000


def start(target: str, env: dict[str, str], ready_path: str, extra: list[str], workers: int = 1
          ) -> tuple[subprocess.Popen[bytes], str]:
    """`target` under uvicorn (workers == 1 and not "default") or gunicorn -c gunicorn.conf.py."""
    port = free_port()
    if workers == 1:
        cmd = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log", *extra]
    else:  # workers == 0: gunicorn.conf.py's own DSPHERE_WORKERS
        cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}",
               "--log-level", "warning", target]
        if workers > 1:
            env = {**env, "DSPHERE_WORKERS": str(workers)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + ready_path, timeout=2).status_code in (200, 405):
                time.sleep(1.0 if workers != 1 else 0.0)  # every worker up, not only the first
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
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--servers", default="1x0,1x0-off,default",
                    help="WxT (workers x inference threads) or default, each with -off: the detector off")
    ap.add_argument("--models", default="fixture,served", help="fixture, served, or both")
    ap.add_argument("--model", default=NAME, help="the served model: a model of the bundled store")
    ap.add_argument("--precisions", default="fp32", help="DSPHERE_PRECISION values of the served model")
    ap.add_argument("--batch-files", type=int, default=0, help="also /classify/batch with this many images")
    ap.add_argument("--rounds", type=int, default=1,
                    help="> 1: every server started at once and the cells interleaved (round, connections, server), "
                    "so that the machine's drift falls on all alike; the run of median req/s of each cell is shown")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (apt-get install wrk)")
    concs = [int(c) for c in args.concurrency.split(",")]
    servers = [s for s in args.servers.split(",") if s]

    tmp = Path(tempfile.mkdtemp(prefix="dsphere-bench-"))
    write_version(tmp / "store", "1")
    stores = {"fixture": (tmp / "store", NAME), "served": (BUNDLED_STORE, args.model)}
    models = [m for m in args.models.split(",") if m]
    precisions = [p for p in args.precisions.split(",") if p]
    # before the servers start, alone on the machine
    compute = {p: model_compute(BUNDLED_STORE, args.model, p) for p in precisions} if "served" in models else {}
    bodies = distinct_bodies(DISTINCT)
    batch = multipart("files", fashion_pngs(args.batch_files)) if args.batch_files else b""
    load_before = os.getloadavg()

    rows: list[tuple[str, int, WrkResult]] = []
    if args.rounds > 1:
        try:
            rows = interleaved(models, stores, servers, bodies, concs, args)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report(rows, args, load_before, compute)
        return
    bare, bare_url = start("bare_app:app", dict(os.environ), "/decode", ["--app-dir", "bench"])
    try:
        rows += measure("bare /decode", bare_url + "/decode", bodies, concs, args.duration)
        if batch:
            rows += measure(f"bare /decode/batch x{args.batch_files}", bare_url + "/decode/batch", [batch], concs,
                            args.duration)
        for model in models:
            store, name = stores[model]
            for precision in precisions if model == "served" else ["fp32"]:
                for server in servers:
                    rows += serve_and_measure(model, store, name, precision, server, bodies, batch, concs, args)
    finally:
        bare.terminate()
        bare.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args, load_before, compute)


def server_env(store: Path, name: str, precision: str, server: str) -> tuple[dict[str, str], int]:
    env = {**os.environ, "DSPHERE_MODEL_STORE": str(store), "DSPHERE_MODEL_NAME": name, "DSPHERE_QUEUE_SIZE": "1024",
           "DSPHERE_PRECISION": precision}
    for key in ("PROMETHEUS_MULTIPROC_DIR", "DSPHERE_QUERY_HISTORY_SHARED_DIR", "DSPHERE_SERVED_MODEL_FILE",
                "DSPHERE_WORKERS", "DSPHERE_INTRA_OP_THREADS"):
        env.pop(key, None)  # gunicorn.conf.py's fresh ones
    if server.endswith("-off"):
        env["DSPHERE_QUERY_HISTORY_ACTION"] = "off"
        server = server.removesuffix("-off")
    if server == "default":
        return env, 0
    w, t = (int(v) for v in server.split("x"))
    env["DSPHERE_INTRA_OP_THREADS"] = str(t)
    return env, w


def interleaved(models: list[str], stores: dict[str, tuple[Path, str]], servers: list[str], bodies: list[bytes],
                concs: list[int], args: argparse.Namespace) -> list[tuple[str, int, WrkResult]]:
    """--rounds: every server up at once (idle ones cost nothing), the cells in turn, the median run of each."""
    procs: list[subprocess.Popen[bytes]] = []
    targets: list[tuple[str, str]] = []
    try:
        proc, url = start("bare_app:app", dict(os.environ), "/decode", ["--app-dir", "bench"])
        procs.append(proc)
        targets.append(("bare /decode", url + "/decode"))
        for model in models:
            store, name = stores[model]
            for server in servers:
                env, workers = server_env(store, name, "fp32", server)
                proc, url = start("app.main:app", env, "/readyz", [], workers)
                procs.append(proc)
                runtime = httpx.get(url + "/healthz", timeout=5).json()["runtime"]
                targets.append((f"/classify {model} [{runtime['backend']}-{runtime['precision']}] {server}",
                                url + "/classify"))
        for _, url in targets:
            run_wrk(url, bodies[-WARMUP:], 4, 1)
        runs: dict[tuple[str, int], list[WrkResult]] = {}
        offsets = dict.fromkeys((label for label, _ in targets), 0)
        for _ in range(args.rounds):
            for c in concs:
                for label, url in targets:
                    threads = min(2, c)
                    r = run_wrk(url, bodies[:-WARMUP], c, args.duration, threads=threads, start=offsets[label])
                    offsets[label] += r.requests // threads + 1
                    runs.setdefault((label, c), []).append(r)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    rows = []
    for (label, c), rs in runs.items():
        rs = sorted(rs, key=lambda r: r.rps)
        print(f"{label} c={c}: req/s of the rounds {', '.join(f'{r.rps:.0f}' for r in rs)}")
        rows.append((label, c, rs[len(rs) // 2]))
    return sorted(rows, key=lambda row: ([t for t, _ in targets].index(row[0]), row[1]))


def serve_and_measure(model: str, store: Path, name: str, precision: str, server: str, bodies: list[bytes],
                      batch: bytes, concs: list[int], args: argparse.Namespace) -> list[tuple[str, int, WrkResult]]:
    env, workers = server_env(store, name, precision, server)
    svc, svc_url = start("app.main:app", env, "/readyz", [], workers)
    try:
        runtime = httpx.get(svc_url + "/healthz", timeout=5).json()["runtime"]
        label = f"{model} [{runtime['backend']}-{runtime['precision']}] {server}"
        rows = measure(f"/classify {label}", svc_url + "/classify", bodies, concs, args.duration)
        if batch:
            rows += measure(f"/classify/batch x{args.batch_files} {label}", svc_url + "/classify/batch", [batch],
                            concs, args.duration)
        return rows
    finally:
        svc.terminate()
        svc.wait(timeout=30)


def report(rows: list[tuple[str, int, WrkResult]], args: argparse.Namespace, load_before: tuple[float, ...],
           compute: dict[str, tuple[str, float]]) -> None:
    ceiling = {(lbl.removeprefix("bare /decode").split(" ")[0], c): r.rps for lbl, c, r in rows
               if lbl.startswith("bare")}
    print(f"\n{os.cpu_count()} CPUs, wrk {args.duration}s per cell, {DISTINCT} distinct images rotated; load average "
          f"(1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| endpoint, model [path] server | connections | req/s | p50 ms | p99 ms | x bare | non-2xx |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for label, c, r in rows:
        kind = label.split(" ")[0].removeprefix("/classify")
        ceil = None if label.startswith("bare") else ceiling.get((kind, c))
        ratio = f"{r.rps / ceil:.2f}" if ceil else ""
        print(f"| {label} | {c} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {ratio} | {r.non_2xx} |")
    for precision, (path, us) in compute.items():
        print(f"\nDSPHERE_PRECISION={precision} runs {path}: {us:.0f} us/image alone at batch 16, i.e. at most "
              f"{1e6 / us:.0f} images/s with nothing else running; the bare ceiling has no model to run.")


def measure(label: str, url: str, bodies: list[bytes], concs: list[int], duration: int
            ) -> list[tuple[str, int, WrkResult]]:
    """wrk at each concurrency after a short warm-up, each run on images the server has not seen yet."""
    run_wrk(url, bodies[-WARMUP:], 4, 1)  # images the runs never send
    bodies = bodies[:-WARMUP]
    out, offset = [], 0
    for c in concs:
        threads = min(2, c)
        r = run_wrk(url, bodies, c, duration, threads=threads, start=offset)
        offset += r.requests // threads + 1
        out.append((label, c, r))
    return out


if __name__ == "__main__":
    main()
