"""Reliability under load and faults: four scenarios against a real `uvicorn app.main:app` on
127.0.0.1 with the bundled model (docs/RELIABILITY.md, sections Load, Overload, Hot reload and
SIGTERM).

Each `run_*` starts its own server (`support.server.start_server`), drives it and returns
what it measured; the result's `violations()` lists every requirement the run broke (empty: it
passed) and `figures()` the numbers worth reporting. tests/reliability/test_load_faults.py runs
them small (part of `make test`), bench/soak.py large (`make soak`).

    run_sustained   N requests by wrk: all 2xx, no socket error, VmRSS growth under a bound
    run_overload    a burst of C connections on a small queue: only 200 and 503 + Retry-After,
                    accepted p99 under a bound, back to the baseline latency within a bound
    run_hot_reload  K swaps between two versions under load, then a tampered and two incomplete
                    versions refused: no failed request, each response names its version
    run_sigterm     SIGTERM during batch uploads: accepted requests complete, new connections are
                    refused, clean exit within a bound
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from support.bundled import BUNDLED_STORE, MODEL_NAME, bundled_version
from support.fashion_mnist import fashion_pngs
from support.loadgen import (
    MULTIPART,
    ClientPool,
    Sample,
    WrkResult,
    burst,
    http_request,
    multipart,
    percentile,
    run_wrk,
    sequential,
)
from support.server import CLEAN_EXIT, ServerHandle, start_server

ADMIN_TOKEN = "soak-admin-token-0123456789abcdef"
MB = 1024 * 1024


def classify_count(srv: ServerHandle) -> int:
    """Requests the server answered on POST /classify so far (dsphere_requests_total, any status)."""
    text = httpx.get(srv.url + "/metrics", timeout=10, trust_env=False).text
    return int(sum(float(v) for v in re.findall(
        r'^dsphere_requests_total\{endpoint="/classify",status="\d+"\} (\S+)$', text, re.M)))


def _stop(srv: ServerHandle) -> int:
    try:
        return srv.stop(timeout=30)
    except AssertionError:  # did not exit: killed by stop()
        return -9


def _percentile_ms(seconds: list[float], q: float) -> float:
    """The q-th percentile of `seconds`, in milliseconds to 0.1."""
    return round(percentile(seconds, q) * 1e3, 1)


# --------------------------------------------------------------------------------- sustained load


@dataclass
class Sustained:
    target: int
    connections: int
    rss_bound_mb: float
    warmup: WrkResult
    run: WrkResult
    rss_before: int
    rss_after: int
    exit_code: int

    @property
    def growth_mb(self) -> float:
        return (self.rss_after - self.rss_before) / MB

    def violations(self) -> list[str]:
        v = []
        r = self.run
        if r.requests < self.target:
            v.append(f"wrk completed {r.requests} requests, fewer than {self.target}")
        for name, w in (("warm-up", self.warmup), ("run", r)):
            if set(w.statuses) != {200} or w.non_2xx_3xx:
                v.append(f"{name}: statuses {w.statuses}, wrk non-2xx/3xx {w.non_2xx_3xx}")
            if w.socket_errors:
                v.append(f"{name}: {w.socket_errors}")
        if self.growth_mb >= self.rss_bound_mb:
            v.append(f"VmRSS grew {self.growth_mb:.1f} MiB (bound {self.rss_bound_mb} MiB)")
        if self.exit_code not in CLEAN_EXIT:
            v.append(f"server exit code {self.exit_code}")
        return v

    def figures(self) -> dict[str, Any]:
        r = self.run
        return {
            "requests": r.requests, "connections": self.connections, "seconds": round(r.seconds, 1),
            "req_per_s": round(r.requests / r.seconds, 1), "p50_ms": r.p50_ms, "p90_ms": r.p90_ms,
            "p99_ms": r.p99_ms, "statuses": r.statuses, "socket_errors": r.socket_errors,
            "rss_before_mib": round(self.rss_before / MB, 1), "rss_after_mib": round(self.rss_after / MB, 1),
            "rss_growth_mib": round(self.growth_mb, 2), "rss_bound_mib": self.rss_bound_mb,
        }


def run_sustained(requests: int, connections: int = 16, rss_bound_mb: float = 20, warmup_s: float = 3,
                  log_path: Path | None = None) -> Sustained:
    """wrk POSTs one Fashion-MNIST PNG to /classify until the server counted `requests` more
    (then SIGINT); VmRSS of the server is read after a warm-up run and after the run."""
    body = multipart("file", fashion_pngs(1))
    srv = start_server(log_path=log_path)
    try:
        url = srv.url + "/classify"
        warm = run_wrk(url, body, connections, warmup_s)
        rss_before = srv.rss_bytes()
        start = classify_count(srv)
        run = run_wrk(url, body, connections, duration_s=60 + requests / 50, poll_s=0.25,
                      stop_when=lambda: classify_count(srv) - start >= requests)
        rss_after = srv.rss_bytes()
    finally:
        rc = _stop(srv)
    return Sustained(requests, connections, rss_bound_mb, warm, run, rss_before, rss_after, rc)


# ------------------------------------------------------------------------------------- overload


@dataclass
class Overload:
    connections: int
    queue_size: int
    burst_s: float
    accepted_p99_bound_s: float
    recovery_bound_s: float
    recovered_factor: float
    steady_connections: int
    steady: WrkResult  # wrk at steady_connections (the queue size), before the burst
    baseline: list[Sample]
    shots: list[Sample]
    connects: list[Sample]  # the burst's connections, opened before its first request
    burst_end: float  # monotonic time the last burst response arrived
    after: list[Sample]
    exit_code: int

    @property
    def baseline_p90_s(self) -> float:
        return percentile([s.latency for s in self.baseline], 90)

    @property
    def recovery_s(self) -> float:
        """From the end of the burst to the start of the first 5 consecutive sequential requests
        that are all 200 and within recovered_factor x the pre-burst p90 (inf: never)."""
        limit = self.recovered_factor * self.baseline_p90_s
        ok = [s.status == 200 and s.latency <= limit for s in self.after]
        for i in range(len(ok) - 4):
            if all(ok[i : i + 5]):
                return self.after[i].sent - self.burst_end
        return float("inf")

    def _lat(self, status: int) -> list[float]:
        return [s.latency for s in self.shots if s.status == status]

    def violations(self) -> list[str]:
        v = []
        statuses = Counter(s.status for s in self.shots)
        if set(self.steady.statuses) != {200} or self.steady.socket_errors:
            v.append(f"at concurrency {self.steady_connections}: {self.steady.statuses} "
                     f"{self.steady.socket_errors or ''}")
        failed_connects = Counter(s.error for s in self.connects if s.error)
        if failed_connects:
            v.append(f"{sum(failed_connects.values())} of {self.connections} connections failed: "
                     f"{dict(failed_connects)}")
        if set(statuses) - {200, 503}:
            errors = Counter(s.error for s in self.shots if s.status is None)
            v.append(f"burst answers other than 200/503: {dict(statuses)} errors {dict(errors)}")
        if not statuses[503]:
            v.append(f"a burst of {self.connections} connections never filled a queue of {self.queue_size}")
        if not statuses[200]:
            v.append("no request was accepted during the burst")
        missing = sum(1 for s in self.shots if s.status == 503 and not (s.retry_after or "").isdigit())
        if missing:
            v.append(f"{missing} of {statuses[503]} 503 answers without a Retry-After of whole seconds")
        p99 = percentile(self._lat(200), 99)
        if not p99 < self.accepted_p99_bound_s:
            v.append(f"accepted p99 {p99 * 1e3:.0f} ms, bound {self.accepted_p99_bound_s * 1e3:.0f} ms")
        if not self.recovery_s < self.recovery_bound_s:
            v.append(f"back to {self.recovered_factor}x the baseline p90 after {self.recovery_s:.2f} s "
                     f"(bound {self.recovery_bound_s} s): {[round(s.latency * 1e3, 1) for s in self.after[:20]]}")
        if self.exit_code not in CLEAN_EXIT:
            v.append(f"server exit code {self.exit_code}")
        return v

    def accepted_p99_by_third_ms(self) -> list[float]:
        """p99 of the accepted requests sent in each third of the burst: flat if bounded in time."""
        if not self.shots:
            return []
        t0 = self.shots[0].sent
        third = (self.shots[-1].sent - t0) / 3 or 1.0
        return [_percentile_ms([s.latency for s in self.shots
                                if s.status == 200 and k <= (s.sent - t0) / third < k + 1], 99)
                for k in range(3)]

    def figures(self) -> dict[str, Any]:
        acc, rej = self._lat(200), self._lat(503)
        return {
            "connections": self.connections, "queue_size": self.queue_size, "burst_s": self.burst_s,
            "connect_max_ms": round(max((s.latency for s in self.connects), default=0) * 1e3, 1),
            "steady_connections": self.steady_connections, "steady_req_per_s": round(self.steady.rps, 1),
            "steady_statuses": self.steady.statuses,
            "baseline_sequential_p50_ms": _percentile_ms([s.latency for s in self.baseline], 50),
            "baseline_sequential_p90_ms": round(self.baseline_p90_s * 1e3, 1),
            "responses": len(self.shots), "statuses": dict(Counter(s.status for s in self.shots)),
            "accepted_per_s": round(len(acc) / self.burst_s, 1),
            "accepted_p50_ms": _percentile_ms(acc, 50), "accepted_p99_ms": _percentile_ms(acc, 99),
            "accepted_max_ms": round(max(acc, default=float("nan")) * 1e3, 1),
            "accepted_p99_bound_ms": self.accepted_p99_bound_s * 1e3,
            "accepted_p99_by_third_ms": self.accepted_p99_by_third_ms(),
            "rejected_p50_ms": _percentile_ms(rej, 50), "rejected_p99_ms": _percentile_ms(rej, 99),
            "retry_after": sorted({s.retry_after for s in self.shots if s.status == 503}, key=str),
            "recovery_s": round(self.recovery_s, 3), "recovery_bound_s": self.recovery_bound_s,
            "after_first_5_ms": [round(s.latency * 1e3, 1) for s in self.after[:5]],
        }


def run_overload(connections: int = 200, queue_size: int = 8, burst_s: float = 3,
                 accepted_p99_bound_s: float = 2.0, recovery_bound_s: float = 1.0,
                 recovered_factor: float = 1.5, sustainable: int | None = None,
                 log_path: Path | None = None) -> Overload:
    """Against DSPHERE_QUEUE_SIZE=queue_size: wrk for 2 s at concurrency `sustainable` (default
    queue_size: with at most queue_size requests in the server, the queue cannot overflow), 40
    sequential requests (baseline), a burst of `connections` raw keep-alive clients for `burst_s`
    s recording every answer, then 60 sequential requests at once."""
    body = multipart("file", fashion_pngs(1))
    # wrk repeats one image: without the result cache every request reaches the model's queue; and
    # none runs inline on the event loop (the served default's model is fast enough that a burst
    # answered inline could leave the queue under its size: the shedding would go untested)
    srv = start_server({"DSPHERE_QUEUE_SIZE": str(queue_size), "DSPHERE_QUERY_HISTORY_RESULT_CACHE": "0",
                        "DSPHERE_INLINE_BATCH_US": "0"},
                       log_path=log_path)
    try:
        steady_connections = sustainable or queue_size
        steady = run_wrk(srv.url + "/classify", body, steady_connections, 2)
        baseline = sequential(srv.url, "/classify", body, 40)
        shots, connects = burst(srv.url, "/classify", body, connections, burst_s)
        end = time.monotonic()
        after = sequential(srv.url, "/classify", body, 60)
    finally:
        rc = _stop(srv)
    return Overload(connections, queue_size, burst_s, accepted_p99_bound_s, recovery_bound_s, recovered_factor,
                    steady_connections, steady, baseline, shots, connects, end, after, rc)


# ----------------------------------------------------------------------------------- hot reload


@dataclass
class Reload:
    version: str
    t0: float
    t1: float
    status: int
    body: dict[str, Any]


@dataclass
class HotReload:
    versions: tuple[str, str]
    swaps: list[Reload]
    refusals: list[Reload]
    samples: list[Sample]
    ready_version: str | None  # /readyz at the end
    exit_code: int
    log_tail: str = ""

    def violations(self) -> list[str]:
        v = []
        failed = [s for s in self.samples if s.status != 200]
        if failed:
            v.append(f"{len(failed)} of {len(self.samples)} requests failed: "
                     f"{Counter((s.status, s.error) for s in failed)}")
        others = Counter(s.version for s in self.samples if s.status == 200 and s.version not in self.versions)
        if others:
            v.append(f"responses naming other versions: {dict(others)}")
        for r in self.swaps:
            if r.status != 200 or r.body.get("model", {}).get("version") != r.version:
                v.append(f"reload to {r.version}: {r.status} {r.body}")
        # a request sent after reload k answered, and answered before reload k+1 began, names version k
        bounds = [r.t0 for r in self.swaps[1:]] + [self.refusals[0].t0 if self.refusals else float("inf")]
        for k, (r, next_t0) in enumerate(zip(self.swaps, bounds, strict=True)):
            window = [s for s in self.samples if s.sent > r.t1 and s.done < next_t0]
            wrong = Counter(s.version for s in window if s.version != r.version)
            if not window or wrong:
                v.append(f"after reload {k} to {r.version}: {len(window)} responses, other versions {dict(wrong)}")
        for r in self.refusals:
            if not 400 <= r.status < 500 or not r.body.get("detail"):
                v.append(f"reload to broken {r.version}: {r.status} {r.body}")
        if self.refusals and self.swaps:
            last = self.swaps[-1].version
            after = [s for s in self.samples if s.sent > self.refusals[0].t0]
            wrong = Counter(s.version for s in after if s.version != last)
            if not after or wrong:
                v.append(f"after the refused reloads: {len(after)} responses, not {last}: {dict(wrong)}")
            if self.ready_version != last:
                v.append(f"/readyz names {self.ready_version}, not {last}")
        if self.exit_code not in CLEAN_EXIT:
            v.append(f"server exit code {self.exit_code}")
        return v

    def figures(self) -> dict[str, Any]:
        took = [r.t1 - r.t0 for r in self.swaps]
        lat = [s.latency for s in self.samples]
        return {
            "swaps": len(self.swaps), "requests": len(self.samples),
            "statuses": dict(Counter(s.status for s in self.samples)),
            "per_version": dict(Counter(s.version for s in self.samples)),
            "reload_p50_ms": _percentile_ms(took, 50), "reload_max_ms": round(max(took, default=0) * 1e3, 1),
            "request_p50_ms": _percentile_ms(lat, 50), "request_p99_ms": _percentile_ms(lat, 99),
            "refused": {r.version: [r.status, r.body.get("detail", "")[:100]] for r in self.refusals},
        }


def make_store(root: Path, bundled: str) -> dict[str, str]:
    """A copy of the bundled model's version `bundled` in `root`, plus 1.0.1 (the same model.onnx,
    manifest version 1.0.1: its sha256 stays valid), 1.0.2 (one byte of model.onnx flipped: sha256
    mismatch), 1.0.3 (no manifest.json) and 1.0.4 (no model.onnx). Returns version -> what it is."""
    src = BUNDLED_STORE / MODEL_NAME / bundled
    model = root / MODEL_NAME

    def copy(version: str) -> Path:
        d = model / version
        shutil.copytree(src, d)
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["version"] = version
        (d / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return d

    shutil.copytree(src, model / bundled)
    copy("1.0.1")
    onnx = bytearray((copy("1.0.2") / "model.onnx").read_bytes())
    onnx[len(onnx) // 2] ^= 0xFF
    (model / "1.0.2" / "model.onnx").write_bytes(bytes(onnx))
    (copy("1.0.3") / "manifest.json").unlink()
    (copy("1.0.4") / "model.onnx").unlink()
    return {bundled: "bundled", "1.0.1": "same model, second version", "1.0.2": "model.onnx tampered",
            "1.0.3": "manifest.json missing", "1.0.4": "model.onnx missing"}


def _reload(client: httpx.Client, version: str) -> Reload:
    t0 = time.monotonic()
    r = client.post("/admin/reload", json={"version": version}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    t1 = time.monotonic()
    try:
        body = r.json()
    except ValueError:
        body = {"raw": r.text[:200]}
    return Reload(version, t0, t1, r.status_code, body)


def run_hot_reload(swaps: int = 10, clients: int = 4, per_window: int = 8, log_path: Path | None = None) -> HotReload:
    """`clients` threads POST to /classify (half a 28x28 Fashion-MNIST PNG, decoded on the event
    loop; half the same image at 320x320, decoded in a worker thread, so those requests hold the
    old runtime across an await when a swap comes) while `swaps` reloads alternate 1.0.1 and
    the bundled version, each waiting for `per_window` answers to requests sent after it; then
    reloads to 1.0.2-1.0.4 (broken, see make_store) must be refused while the good two keep serving."""
    bundled = bundled_version()
    tmp = Path(tempfile.mkdtemp(prefix="dsphere-reload-"))
    make_store(tmp, bundled)
    env = {"DSPHERE_MODEL_STORE": str(tmp), "DSPHERE_MODEL_VERSION": bundled,
           "DSPHERE_ADMIN_TOKEN": ADMIN_TOKEN}
    try:
        srv = start_server(env, log_path=log_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pools = [ClientPool(srv.url, multipart("file", fashion_pngs(1)), n=max(1, clients // 2)),
             ClientPool(srv.url, multipart("file", fashion_pngs(1, side=320)), n=max(1, clients - clients // 2))]
    done: list[Reload] = []
    refused: list[Reload] = []
    ready = None
    try:
        for p in pools:
            p.start()
        for p in pools:
            p.wait_for(per_window, after=0)
        with srv.client() as c:
            for k in range(swaps):
                r = _reload(c, ("1.0.1", bundled)[k % 2])
                done.append(r)
                for p in pools:
                    p.wait_for(per_window, after=r.t1)
            for bad in ("1.0.2", "1.0.3", "1.0.4"):
                refused.append(_reload(c, bad))
            for p in pools:
                p.wait_for(per_window, after=refused[-1].t1)
            rz = c.get("/readyz")
            ready = rz.json().get("model", {}).get("version") if rz.status_code == 200 else None
    finally:
        samples = sorted([s for p in pools for s in p.stop()], key=lambda s: s.sent)
        rc = _stop(srv)
        shutil.rmtree(tmp, ignore_errors=True)
    # the refusals name files of the temporary store: recorded under "<store>", not this machine's folder
    refused = [Reload(r.version, r.t0, r.t1, r.status,
                      {**r.body, "detail": str(r.body.get("detail", "")).replace(str(tmp), "<store>")})
               for r in refused]
    return HotReload(("1.0.1", bundled), done, refused, samples, ready, rc, srv.log_tail())


# -------------------------------------------------------------------------------------- SIGTERM


@dataclass
class Sigterm:
    clients: int
    files: int
    exit_bound_s: float
    t_signal: float
    batch: list[tuple[Sample, int]]  # (sample, number of results) of each batch upload
    held: list[tuple[Sample, int]]  # uploads whose last bytes were sent after the signal
    probes: list[Sample]  # new connections after the signal
    pool: list[Sample]  # keep-alive /classify clients running through the signal
    exit_code: int
    exit_s: float
    log_tail: str = ""

    def violations(self) -> list[str]:
        v = []
        if self.exit_code not in CLEAN_EXIT:
            v.append(f"exit code {self.exit_code}")
        if not self.exit_s < self.exit_bound_s:
            v.append(f"exited {self.exit_s:.2f} s after SIGTERM (bound {self.exit_bound_s} s)")
        if len(self.batch) != self.clients:
            v.append(f"{len(self.batch)} batch uploads recorded, {self.clients} started")
        for name, rows in (("batch upload", self.batch), ("held upload", self.held)):
            bad = [(s.status, s.error, n) for s, n in rows if s.status != 200 or n != self.files]
            if bad:
                v.append(f"{len(bad)} of {len(rows)} {name}s sent before SIGTERM did not complete: {bad[:5]}")
        if not any(s.done > self.t_signal for s, _ in self.batch):
            v.append("no batch upload was in flight at SIGTERM (load too light to test anything)")
        hung = [s for s in self.probes + self.pool if s.error and "Timeout" in s.error]
        if hung:
            v.append(f"{len(hung)} requests hung until their timeout after SIGTERM")
        if not any(s.error == "ConnectError" for s in self.probes):
            v.append(f"new connections were never refused after SIGTERM: {[(s.status, s.error) for s in self.probes]}")
        for name, rows2 in (("new connection", self.probes), ("keep-alive", self.pool)):
            odd = [s.status for s in rows2 if s.status is not None and s.status != 200
                   and not (s.status == 503 and s.retry_after)]
            if odd:
                v.append(f"{name} requests answered {Counter(odd)}")
        return v

    def figures(self) -> dict[str, Any]:
        after = [s for s in self.pool if s.sent >= self.t_signal]
        # a request sent on an idle keep-alive connection just as uvicorn closes it (HTTP/1.1 race)
        before_failed = [s.error for s in self.pool if s.status is None and s.sent < self.t_signal]
        return {
            "batch_uploads": len(self.batch), "files_each": self.files,
            "batch_completed_after_signal": sum(1 for s, _ in self.batch if s.done > self.t_signal),
            "batch_statuses": dict(Counter(s.status for s, _ in self.batch)),
            "held_uploads_completed": sum(1 for s, n in self.held if s.status == 200 and n == self.files),
            "held_uploads": len(self.held),
            "keepalive_requests": len(self.pool),
            "keepalive_after_signal": dict(Counter(s.status or s.error for s in after)),
            "keepalive_failed_before_signal": before_failed,
            "new_connections_after_signal": [s.status or s.error for s in self.probes],
            "exit_code": self.exit_code, "exit_s": round(self.exit_s, 2), "exit_bound_s": self.exit_bound_s,
        }


def _held_upload(srv: ServerHandle, body: bytes) -> tuple[socket.socket, bytes, float]:
    """Open a connection and send all of a /classify/batch request but its last 1000 bytes."""
    request = http_request(srv.url, "/classify/batch", body)
    port = int(srv.url.rsplit(":", 1)[1])
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(request[:-1000])
    return sock, request[-1000:], t0


def _finish_held(sock: socket.socket, rest: bytes, t0: float) -> tuple[Sample, int]:
    try:
        sock.sendall(rest)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        n = len(json.loads(body)["results"]) if status == 200 else 0
        return Sample(t0, time.monotonic(), status), n
    except (OSError, ValueError, IndexError) as e:
        return Sample(t0, time.monotonic(), None, error=type(e).__name__), 0
    finally:
        sock.close()


def _length(data: bytes) -> int:
    m = re.search(rb"\r\ncontent-length: *(\d+)", data.split(b"\r\n\r\n", 1)[0], re.I)
    return int(m.group(1)) if m else 0


def run_sigterm(clients: int = 16, files: int = 64, held: int = 2, signal_after_s: float = 0.3,
                exit_bound_s: float = 10, log_path: Path | None = None) -> Sigterm:
    """`held` connections send a /classify/batch upload but its last 1000 bytes; `clients` threads
    (connected and served once already) POST /classify/batch with `files` Fashion-MNIST PNGs at
    the same moment, and 2 keep-alive clients POST /classify in a loop. `signal_after_s` later the
    server gets SIGTERM; the held uploads send their last bytes 0.5 s after it. Meanwhile a new
    connection is tried every 50 ms until one is refused."""
    body = multipart("files", fashion_pngs(files))
    srv = start_server({"DSPHERE_MAX_BATCH_FILES": str(files)}, log_path=log_path)
    results: list[tuple[Sample, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1, timeout=60)
    exited: list[float] = []

    def client() -> None:
        t0 = time.monotonic()
        try:
            with srv.client() as c:
                c.get("/readyz")  # the connection is open and served once
                start.wait()
                t0 = time.monotonic()
                r = c.post("/classify/batch", content=body, headers={"Content-Type": MULTIPART})
                n = len(r.json()["results"]) if r.status_code == 200 else 0
                row = (Sample(t0, time.monotonic(), r.status_code, retry_after=r.headers.get("retry-after")), n)
        except (httpx.TransportError, threading.BrokenBarrierError) as e:
            row = (Sample(t0, time.monotonic(), None, error=type(e).__name__), 0)
        with lock:
            results.append(row)

    def watch_exit() -> None:
        srv.proc.wait()
        exited.append(time.monotonic())

    pool = ClientPool(srv.url, multipart("file", fashion_pngs(1)), n=2, timeout_s=15)
    try:
        pool.start()
        holds = [_held_upload(srv, body) for _ in range(held)]
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        start.wait()
        time.sleep(signal_after_s)
        t_signal = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        threading.Thread(target=watch_exit, daemon=True).start()

        probes: list[Sample] = []
        while time.monotonic() - t_signal < 3:
            t0 = time.monotonic()
            try:
                with httpx.Client(base_url=srv.url, timeout=5, trust_env=False, verify=False) as c:
                    r = c.get("/healthz")
                probes.append(Sample(t0, time.monotonic(), r.status_code, retry_after=r.headers.get("retry-after")))
            except httpx.TransportError as e:
                probes.append(Sample(t0, time.monotonic(), None, error=type(e).__name__))
                if isinstance(e, httpx.ConnectError):
                    break
            time.sleep(0.05)
        time.sleep(max(0.0, t_signal + 0.5 - time.monotonic()))
        held_rows = [_finish_held(sock, rest, t0) for sock, rest, t0 in holds]
        for t in threads:
            t.join(timeout=60)
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed below, reported as a violation
            srv.proc.wait(timeout=exit_bound_s + 20)
    finally:
        if srv.proc.poll() is None:  # an error above, or no exit: do not leave it running
            srv.proc.kill()
            srv.proc.wait()
        pool_samples = pool.stop()
    rc = srv.proc.returncode
    srv.returncode = rc
    exit_s = (exited[0] if exited else time.monotonic()) - t_signal
    return Sigterm(clients, files, exit_bound_s, t_signal, results, held_rows, probes, pool_samples, rc, exit_s,
                   srv.log_tail())
