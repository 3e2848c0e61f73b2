"""Load generators for a real dsphere server, shared by bench/bench_service.py, bench/soak.py and
tests/reliability/test_load_faults.py.

* `run_wrk`: wrk with a Lua script that POSTs a multipart body, counts the responses per status
  and the 503s without a Retry-After header, and can stop each wrk thread after N responses.
* `burst`: many asyncio clients on raw keep-alive sockets (HTTP/1.1, no client library, so the
  client costs little CPU beside the server), recording every response: send and receive time,
  status, Retry-After. wrk cannot time single responses; this can.
* `ClientPool`: threads of httpx clients POSTing in a loop until stopped, recording every
  response and the model version it names (hot reload checks).
* `sequential`: one keep-alive connection, requests one after another (latency baseline).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

BOUNDARY = "dsphereBenchBoundary7MA4YWxkTrZu0gW"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"

# Lua for wrk: each request is a POST of one of the bodies in the file BENCH_BODY (their lengths, one a
# line, in BENCH_LENGTHS): thread t of T sends body (WRK_START + t * n / T + k) mod n as its k-th request,
# so that the threads together rotate through all n bodies (distinct images: the query-history
# detector's exact-repeat cache answers none of them before the rotation comes round). Per wrk thread it
# counts statuses and 503s without Retry-After and stops the thread after WRK_LIMIT responses (0: no
# limit); done() sums the threads and prints "STATUS <code> <n>" lines and "MISSING_RETRY_AFTER <n>".
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "CONTENT_TYPE"
local threads = {}
function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end
function init(args)
  limit = tonumber(os.getenv("WRK_LIMIT") or "0")
  count = 0
  statuses = {}
  missing_retry = 0
  local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
  local all = f:read("*all")
  f:close()
  requests = {}
  local pos = 1
  for len in io.lines(os.getenv("BENCH_LENGTHS")) do
    local n = tonumber(len)
    table.insert(requests, wrk.format(nil, nil, nil, all:sub(pos, pos + n - 1)))
    pos = pos + n
  end
  local t = tonumber(thread_index or 0)
  local nthreads = tonumber(os.getenv("WRK_THREADS") or "1")
  next_index = (tonumber(os.getenv("WRK_START") or "0") + math.floor(t * #requests / nthreads)) % #requests
end
function request()
  local r = requests[next_index + 1]
  next_index = (next_index + 1) % #requests
  return r
end
function response(status, headers, body)
  count = count + 1
  statuses[status] = (statuses[status] or 0) + 1
  if status == 503 and headers["retry-after"] == nil and headers["Retry-After"] == nil then
    missing_retry = missing_retry + 1
  end
  if limit > 0 and count >= limit then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local total, miss = {}, 0
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses") or {}) do total[k] = (total[k] or 0) + v end
    miss = miss + (t:get("missing_retry") or 0)
  end
  for k, v in pairs(total) do io.write(string.format("STATUS %d %d\\n", k, v)) end
  io.write(string.format("MISSING_RETRY_AFTER %d\\n", miss))
end
""".replace("CONTENT_TYPE", MULTIPART)


def multipart(field_name: str, images: list[bytes]) -> bytes:
    """A multipart/form-data body (boundary BOUNDARY) with one part `field_name` per image."""
    out = bytearray()
    for i, data in enumerate(images):
        out += (
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{i}.png\"\r\n"
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        out += data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))]


# ---------------------------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int  # responses wrk completed
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    statuses: dict[int, int]  # from the Lua script
    non_2xx_3xx: int  # wrk's own "Non-2xx or 3xx responses" count
    socket_errors: str | None  # wrk's "Socket errors: ..." line, None when there were none
    missing_retry_after: int
    output: str

    @property
    def non_2xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if not 200 <= s < 300)


def run_wrk(url: str, body: bytes | Sequence[bytes], connections: int, duration_s: float, threads: int = 2,
            limit_per_thread: int = 0, timeout_s: float = 10,
            stop_when: Callable[[], bool] | None = None, poll_s: float = 0.1, start: int = 0) -> WrkResult:
    """POST `body` (a multipart() body, or several: see WRK_LUA, from `start` on) to `url` with wrk for
    `duration_s` seconds.

    `stop_when`, polled every `poll_s`, ends the run early (SIGINT: wrk stops its threads and
    prints its summary), e.g. once the server counted N requests. `limit_per_thread` stops each
    wrk thread after that many responses (wrk itself still runs for `duration_s`).
    """
    threads = max(1, min(threads, connections))
    with tempfile.TemporaryDirectory(prefix="dsphere-wrk-") as tmp:
        bodies = [body] if isinstance(body, bytes) else list(body)
        body_file, lengths, lua = Path(tmp) / "body.bin", Path(tmp) / "lengths.txt", Path(tmp) / "upload.lua"
        body_file.write_bytes(b"".join(bodies))
        lengths.write_text("".join(f"{len(b)}\n" for b in bodies))
        lua.write_text(WRK_LUA)
        env = {**os.environ, "BENCH_BODY": str(body_file), "BENCH_LENGTHS": str(lengths),
               "WRK_LIMIT": str(limit_per_thread), "WRK_START": str(start), "WRK_THREADS": str(threads)}
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration_s))}s",
                "--timeout", f"{timeout_s:g}s", "--latency", "-s", str(lua), url]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
            if stop_when is not None:
                while proc.poll() is None and not stop_when():
                    time.sleep(poll_s)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=duration_s + timeout_s + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk exited with {proc.returncode}: {err.strip()}")
    return parse_wrk(out)


def _wrk_duration_ms(value: str, unit: str) -> float:
    """A duration as wrk prints it (number and unit: us, ms, s or m) in milliseconds."""
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(out: str) -> WrkResult:
    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return _wrk_duration_ms(m.group(1), m.group(2)) if m else float("nan")

    def count(pattern: str) -> int:
        m = re.search(pattern, out, re.M)
        return int(m.group(1)) if m else 0

    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return WrkResult(
        requests=int(total.group(1)) if total else 0,
        seconds=_wrk_duration_ms(total.group(2), total.group(3)) / 1e3 if total else float("nan"),
        rps=float(rps.group(1)) if rps else float("nan"),
        p50_ms=pct("50"), p90_ms=pct("90"), p99_ms=pct("99"),
        statuses={int(s): int(n) for s, n in re.findall(r"^STATUS (\d+) (\d+)$", out, re.M)},
        non_2xx_3xx=count(r"Non-2xx or 3xx responses:\s+(\d+)"),
        socket_errors=errors.group(0) if errors else None,
        missing_retry_after=count(r"^MISSING_RETRY_AFTER (\d+)$"),
        output=out,
    )


# ------------------------------------------------------------------------- per-response recording


@dataclass
class Sample:
    sent: float  # time.monotonic() when the request started
    done: float  # when its response (or error) arrived
    status: int | None  # None: transport error (refused, reset, closed, timeout)
    version: str | None = None  # "model"."version" of a 200 answer (ClientPool)
    error: str | None = None
    retry_after: str | None = None

    @property
    def latency(self) -> float:
        return self.done - self.sent


def http_request(url: str, path: str, body: bytes, content_type: str = MULTIPART) -> bytes:
    """The raw bytes of an HTTP/1.1 keep-alive POST of `body` to `path`."""
    host = urlsplit(url).netloc
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _burst(url: str, request: bytes, concurrency: int, duration_s: float,
                 timeout_s: float) -> tuple[list[Sample], list[Sample]]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    samples: list[Sample] = []
    connects: list[Sample] = []
    go = asyncio.Event()
    deadline = 0.0

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        t0 = time.monotonic()
        try:
            conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, TimeoutError) as e:
            connects.append(Sample(t0, time.monotonic(), None, error=type(e).__name__))
            return None
        connects.append(Sample(t0, time.monotonic(), 0))
        return conn

    async def client() -> None:
        conn = await connect()  # every connection is open before the first request is sent
        await go.wait()
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            if conn is None:
                conn = await connect()
                if conn is None:
                    samples.append(Sample(t0, time.monotonic(), None, error="ConnectError"))
                    continue
            reader, writer = conn
            try:
                writer.write(request)
                status, headers, _ = await asyncio.wait_for(_read_response(reader), timeout_s)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                samples.append(Sample(t0, time.monotonic(), None, error=type(e).__name__))
                writer.close()
                conn = None
                continue
            samples.append(Sample(t0, time.monotonic(), status, retry_after=headers.get("retry-after")))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                conn = None
        if conn is not None:
            conn[1].close()

    tasks = [asyncio.ensure_future(client()) for _ in range(concurrency)]
    while len(connects) < concurrency:
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + duration_s
    go.set()
    await asyncio.gather(*tasks)
    return samples, connects


def burst(url: str, path: str, body: bytes, concurrency: int, duration_s: float,
          timeout_s: float = 30) -> tuple[list[Sample], list[Sample]]:
    """`concurrency` clients, each on its own keep-alive connection (all opened first), POSTing
    `body` (multipart) to `path` back to back for `duration_s`; returns every answer in order of
    sending (a reconnect after the server closed a connection counts in its request's time) and
    the initial connects (status 0, or the error)."""
    samples, connects = asyncio.run(_burst(url, http_request(url, path, body), concurrency, duration_s, timeout_s))
    return sorted(samples, key=lambda s: s.sent), connects


def sequential(url: str, path: str, body: bytes, n: int, timeout_s: float = 30) -> list[Sample]:
    """`n` requests one after another on one keep-alive connection."""
    out = []
    with httpx.Client(base_url=url, timeout=timeout_s, trust_env=False, verify=False) as c:
        for _ in range(n):
            t0 = time.monotonic()
            r = c.post(path, content=body, headers={"Content-Type": MULTIPART})
            out.append(Sample(t0, time.monotonic(), r.status_code, retry_after=r.headers.get("retry-after")))
    return out


@dataclass
class ClientPool:
    """`n` threads, each POSTing `body` (multipart) to `path` in a loop on its own keep-alive
    connection until stop(), recording every response and the model version it names."""

    base_url: str
    body: bytes
    n: int = 4
    path: str = "/classify"
    timeout_s: float = 30
    retry_s: float = 0.05  # pause after a transport error
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.n)]

    def _run(self) -> None:
        # plain HTTP on loopback: verify=False only skips loading the CA bundle
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s, trust_env=False, verify=False) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post(self.path, content=self.body, headers={"Content-Type": MULTIPART})
                except httpx.TransportError as e:
                    s = Sample(t0, time.monotonic(), None, error=type(e).__name__)
                    self._stop.wait(self.retry_s)  # a refused connection fails at once: do not spin
                else:
                    version = r.json().get("model", {}).get("version") if r.status_code == 200 else None
                    s = Sample(t0, time.monotonic(), r.status_code, version, retry_after=r.headers.get("retry-after"))
                with self._lock:
                    self.samples.append(s)

    def start(self) -> ClientPool:
        for t in self._threads:
            t.start()
        return self

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def wait_for(self, n: int, after: float, timeout_s: float = 30) -> None:
        """Block until `n` requests sent after time `after` (monotonic) have been answered."""
        end = time.monotonic() + timeout_s
        while sum(s.sent > after for s in self.snapshot()) < n:
            if time.monotonic() > end:
                raise TimeoutError(f"fewer than {n} responses within {timeout_s} s")
            time.sleep(0.01)

    def stop(self) -> list[Sample]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)
        return sorted(self.snapshot(), key=lambda s: s.sent)


def distinct_bodies(n: int, field_name: str = "file", per_body: int = 1) -> list[bytes]:
    """`n` multipart bodies of distinct Fashion-MNIST training images (`per_body` each), for
    run_wrk: a benchmark that sends one image again and again measures the query-history
    detector's exact-repeat cache, not the service."""
    from support.fashion_mnist import load_fashion_mnist_train, png_bytes

    # encoding 60,000 PNGs takes seconds: kept once per machine in the temporary directory
    cache = Path(tempfile.gettempdir()) / f"dsphere-train-pngs-{n * per_body}.bin"
    try:
        blob = cache.read_bytes()
        lengths = np.frombuffer(blob[: 4 * n * per_body], "<u4")
        offsets = 4 * n * per_body + np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        pngs = [blob[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    except (OSError, ValueError):
        pngs = [png_bytes(a) for a in load_fashion_mnist_train(n * per_body)]
        tmp = cache.with_suffix(f".{os.getpid()}")
        tmp.write_bytes(np.asarray([len(p) for p in pngs], "<u4").tobytes() + b"".join(pngs))
        tmp.replace(cache)
    return [multipart(field_name, pngs[i : i + per_body]) for i in range(0, len(pngs) - per_body + 1, per_body)]
