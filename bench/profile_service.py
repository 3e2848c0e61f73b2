"""Where a /classify request's time goes: py-spy on the live server under wrk load.

    python bench/profile_service.py [--model fixture|served] [--seconds 10] [--connections 16]
                                    [--rate 250] [--out DIR]

Starts `uvicorn app.main:app` (one worker; the query-history detector on, its default "reject"),
on the tiny fixture model of support/fake_store.py (about 1 us an image: the service's own work
alone) or on the served model of the bundled store; loads it with wrk at `--connections`,
rotating through 60,000 distinct Fashion-MNIST training images (so the detector's exact-repeat
cache answers none of them), and samples the worker with `py-spy record --nonblocking` (threads
apart, idle samples left out) while the load runs. Prints, for the event loop's thread and for
the inference thread, the share of samples by what the request was doing (the innermost frame
of a known kind, from the leaf up: see KINDS), then the top frames by own time and by time
including callees; `--out` keeps the raw collapsed stacks (py-spy's "raw" format, which
flamegraph.pl or speedscope draw).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from support.bundled import BUNDLED_STORE, MODEL_NAME, REPO
from support.fake_store import write_version
from support.loadgen import distinct_bodies, run_wrk
from support.server import free_port

# (kind, pattern on "function (file)") from the leaf up: the first frame that matches names the sample.
KINDS: list[tuple[str, str]] = [
    ("model (inference runtime)", r"onnxruntime|openvino|app/runtimes\.py|run_model"),
    ("verdict rule", r"app/verdict\.py"),
    ("query history (fingerprints, store)", r"app/(fingerprint|history_store|query_history|result_cache)\.py"),
    ("metrics (prometheus_client)", r"prometheus_client"),
    ("image decode (Pillow, numpy)", r"PIL/|app/images\.py"),
    ("multipart parsing", r"python_multipart|app/uploads\.py"),
    ("response (pydantic, JSON)", r"pydantic|json/|jsonable_encoder|serialize_response|app/schemas\.py"
                                  r"|classifications \(app/service\.py"),
    ("request id, middleware", r"app/middleware\.py|uuid\.py|starlette/middleware|fastapi/middleware"),
    ("routing, dependencies (FastAPI, Starlette)", r"fastapi/|starlette/"),
    ("micro-batcher hand-off", r"app/engine\.py|concurrent/futures|threading\.py"),
    ("service (classify, metrics calls)", r"app/"),
    ("HTTP protocol (uvicorn, h11/httptools)", r"uvicorn/|h11/|httptools"),
    ("event loop (asyncio, uvloop)", r"asyncio/|uvloop|selectors\.py"),
]
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (path/to/file.py)', the path from site-packages or the repo on."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.", str(REPO) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker.startswith("lib/python3."):
                file = file.split("/", 1)[1] if "/" in file else file
            break
    return f"{m.group('func')} ({file})"


def kind_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for kind, pattern in KINDS:
            if re.search(pattern, frame):
                return kind
    return "other"


def summarize(raw: Path, top: int) -> str:
    """The collapsed stacks of `raw` summarized per thread (see the module docstring), as Markdown."""
    threads: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        parts = stack_text.split(";")
        # py-spy --threads: 'process ...;thread (0x...)' first, then the frames (root first)
        head = [p for p in parts[:2] if p.startswith(("process", "thread"))]
        frames = [frame_name(p) for p in parts[len(head):]]
        thread = head[-1] if head and head[-1].startswith("thread") else "thread"
        threads[thread].append((frames, int(count)))
    total = sum(n for stacks in threads.values() for _, n in stacks)
    out = [f"{total} samples in all"]
    ranked = sorted(threads.items(), key=lambda kv: -sum(n for _, n in kv[1]))
    for thread, stacks in ranked:
        n_thread = sum(n for _, n in stacks)
        if n_thread < 0.02 * total:
            continue
        kinds: collections.Counter[str] = collections.Counter()
        own: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        for frames, n in stacks:
            kinds[kind_of(frames)] += n
            if frames:
                own[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
        out.append(f"\n{thread}: {n_thread} samples ({100 * n_thread / total:.0f} % of all)\n")
        out.append("| what | share of the thread's samples |\n| --- | --- |")
        out += [f"| {k} | {100 * n / n_thread:.1f} % |" for k, n in kinds.most_common()]
        out.append(f"\ntop {top} frames by own time (leaf):\n")
        out += [f"    {100 * n / n_thread:5.1f} %  {f}" for f, n in own.most_common(top)]
        app_frames = [(f, n) for f, n in incl.most_common() if "(app/" in f or "(bench/" in f]
        out.append(f"\ntop {top} of the service's own functions by time including callees:\n")
        out += [f"    {100 * n / n_thread:5.1f} %  {f}" for f, n in app_frames[:top]]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["fixture", "served"], default="fixture")
    ap.add_argument("--seconds", type=int, default=10, help="seconds sampled under load")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples a second")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None, help="keep the raw collapsed stacks here")
    ap.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the server")
    args = ap.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists() or shutil.which("wrk") is None:
        raise SystemExit("needs py-spy (pip install py-spy) and wrk (apt-get install wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="dsphere-profile-"))
    if args.model == "fixture":
        store, name = tmp / "store", MODEL_NAME
        write_version(store, "1")
    else:
        store, name = BUNDLED_STORE, MODEL_NAME
    env = {**os.environ, "DSPHERE_MODEL_STORE": str(store), "DSPHERE_MODEL_NAME": name, "DSPHERE_QUEUE_SIZE": "1024",
           **dict(kv.split("=", 1) for kv in args.env)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning", "--no-access-log"], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    raw = (args.out or tmp) / f"profile-{args.model}.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not become ready")
            time.sleep(0.1)
        bodies = distinct_bodies(60_000)
        run_wrk(url + "/classify", bodies, 4, 1, start=50_000)  # warm-up on images the run will not send
        result: dict[str, object] = {}
        load = threading.Thread(target=lambda: result.setdefault(
            "wrk", run_wrk(url + "/classify", bodies, args.connections, args.seconds + 2)))
        load.start()
        time.sleep(1)
        subprocess.run([py_spy, "record", "--pid", str(proc.pid), "--rate", str(args.rate), "--duration",
                        str(args.seconds), "--format", "raw", "--threads", "--nonblocking", "--output", str(raw)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        load.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    w = result["wrk"]
    print(f"{args.model} model ({name}), 1 uvicorn worker, wrk {args.connections} connections: "
          f"{w.rps:.0f} req/s, p50 {w.p50_ms:.2f} ms, p99 {w.p99_ms:.2f} ms, statuses {w.statuses}; "  # type: ignore[attr-defined]
          f"load average {os.getloadavg()[0]:.2f}; py-spy {args.rate} Hz for {args.seconds} s, raw stacks {raw}\n")
    print(summarize(raw, args.top))
    if args.out is None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
