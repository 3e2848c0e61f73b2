"""Benign traffic and cost of the query-history detector (#26), against live servers.

    python bench/bench_query_history.py [--n 70000] [--batch 64] [--retaken 2000] [--duration 10]
        [--concurrency 16] [--rounds 2] [--lookup-calls 3000] [--mem-queries 1000000]
        [--mem-mb 512,500,256] [--attack-seeds 12] [--attack-queries 60] [--sections all]
        [--out docs/results/query-history]

Sections (--sections, comma-separated, or all):
  benign   the 70,000 Fashion-MNIST images (train 60k + test 10k) each sent once, in random
           order, through a live server (support/server.py, detector on: reject, in-process
           store, defaults otherwise) by V2 infer, `--batch` rows a request (each row is
           judged as its own query): the rows answered reason "query_history" are false
           positives, listed by image (train[i] / test[j]).
  retries  the same stream on a fresh server with 10 % exact retries (a random earlier image
           sent again, 1-1,000 queries after it): none may be flagged unless its first
           query was.
  retaken  "re-taken photos": `--retaken` images, each sent once and re-sent 3 times shifted
           by a pixel (random direction, zero fill) or brightened by 8 levels (3 %), in random
           order, fresh server: the share of re-takes flagged, reported as it is.
  cost     /classify throughput (wrk, the Lua of support/loadgen.py made to rotate through
           distinct PNGs: each request a different test image, so the detector judges every
           one rather than answering an exact repeat) at `--concurrency` connections, one
           uvicorn worker, detector off / on (in-process) / on (Redis, support/redis_server.py),
           `--rounds` rounds in alternating order, each on a fresh server (and an emptied Redis);
           dsphere_query_history_lookup_seconds read from each server's /metrics.
  lookup   QueryHistory.judge timed in-process, one image a call, each a new image (the full
           path: digest, fingerprint, table), `--lookup-calls` times, in-process and Redis
           store; also the exact-repeat path and a batch of 64.
  memory   a LocalStore of each table size (MB) in `--mem-mb`, each in its own process: its RSS
           growth after storing `--mem-queries` distinct (random) fingerprints of 50 hashes,
           and how many of those queries the table still holds (>= threshold of their hashes
           left, i.e. a near-duplicate of them would still be caught), by age.
  attack   a Square-like stream (stripes of +-eps, then random squares of +-eps, eps 0.1;
           the same pre-drawn queries whatever the answers) on `--attack-seeds` test images,
           `--attack-queries` each, one V2 query a request: the query of the first reason
           "query_history" and the share of queries flagged, against one server
           (in-process store; and with Redis), round-robin over two workers of one server
           (uvicorn --workers 2, new connection each request) and alternately over two servers
           sharing one Redis ("two replicas"); the salt unset (shared through Redis).

Prints a table per section and writes <out>/benign-and-cost.json and .md. Targets (#26):
false positives <= 0.1 %, none among exact retries; throughput on >= 0.9x off (in-process),
>= 0.8x (Redis); lookup p99 <= 1 ms; 1 million queries <= 512 MB; two workers / replicas
detected within +-20 % of the queries against one. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from support.bundled import REPO
from support.fashion_mnist import load_fashion_mnist_test, load_fashion_mnist_train, png_bytes
from support.loadgen import MULTIPART, multipart, parse_wrk
from support.redis_server import RedisHandle, start_redis
from support.server import ServerHandle, start_server

MODEL = "fashion-mnist-dsphere"  # the model served (docs/results/query-history/ were measured on it)
MODEL_VERSION = "3.1.0"  # its version then (4.0.0, published since, is another network)

EPS = 0.1
SECTIONS = ("benign", "retries", "retaken", "cost", "lookup", "memory", "attack")
# the shortest decimal of each float32 k/255: what a PNG decodes to, parsed back to the same float32
LEVEL_STR = [str(np.float32(k / 255)) for k in range(256)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -------------------------------------------------------------------------------------- images


def all_images() -> tuple[np.ndarray, list[str]]:
    """The 70,000 images, uint8 [70000, 28, 28]: train 0..59999 then test 0..9999, and their names."""
    train, test = load_fashion_mnist_train(60_000), load_fashion_mnist_test(10_000)
    names = [f"train[{i}]" for i in range(len(train))] + [f"test[{i}]" for i in range(len(test))]
    return np.concatenate([train, test]), names


def shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """img moved by (dy, dx) pixels, zero fill (a re-taken photo, slightly off)."""
    out = np.zeros_like(img)
    h, w = img.shape
    out[max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = img[max(-dy, 0): h - max(dy, 0),
                                                                       max(-dx, 0): w - max(dx, 0)]
    return out


def retake(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        dy, dx = [(0, 1), (0, -1), (1, 0), (-1, 0)][int(rng.integers(4))]
        return shift(img, dy, dx)
    return np.clip(img.astype(np.int16) + 8, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------- V2 infer


class V2Client:
    """V2 infer of uint8 images (sent as the float32 values a PNG decodes to) or float32 rows."""

    def __init__(self, handle: ServerHandle, keepalive: bool = True) -> None:
        limits = None if keepalive else httpx.Limits(max_keepalive_connections=0)
        self.c = handle.client(timeout=120, **({"limits": limits} if limits else {}))
        meta = self.c.get(f"/v2/models/{MODEL}").json()
        self.input_name = meta["inputs"][0]["name"]

    def _body(self, n: int, data: str) -> bytes:
        head = f'{{"inputs":[{{"name":"{self.input_name}","shape":[{n},1,28,28],"datatype":"FP32","data":['
        return (head + data + ']}],"outputs":[{"name":"label"},{"name":"accepted"},{"name":"reason"}]}').encode()

    def infer_u8(self, imgs: np.ndarray) -> list[str]:
        data = ",".join([LEVEL_STR[v] for v in imgs.reshape(-1).tolist()])
        return self._post(self._body(len(imgs), data))

    def infer_f32(self, x: np.ndarray) -> list[str]:
        data = ",".join([str(v) for v in np.asarray(x, np.float32).reshape(-1)])
        return self._post(self._body(len(x), data))

    def _post(self, body: bytes) -> list[str]:
        r = self.c.post(f"/v2/models/{MODEL}/infer", content=body, headers={"Content-Type": "application/json"})
        r.raise_for_status()
        out = {o["name"]: o["data"] for o in r.json()["outputs"]}
        return [str(x) for x in out["reason"]]

    def close(self) -> None:
        self.c.close()


def server_env(**kw: str) -> dict[str, str]:
    return {"DSPHERE_MODEL_NAME": MODEL, "DSPHERE_MODEL_VERSION": MODEL_VERSION,
            "DSPHERE_QUERY_HISTORY_ACTION": "reject", "DSPHERE_QUEUE_SIZE": "1024", **kw}


@contextmanager
def server(env: dict[str, str], workers: int = 1) -> Iterator[ServerHandle]:
    fd, name = tempfile.mkstemp(prefix="dsphere-bench-qh-", suffix=".log")
    os.close(fd)
    with start_server(env, workers=workers, log_path=Path(name)) as h:
        yield h
    Path(name).unlink(missing_ok=True)


def send_stream(h: ServerHandle, imgs: np.ndarray, order: list[int], batch: int, what: str) -> list[str]:
    """Each index of `order` sent once (in order, `batch` rows a request): each row's reason."""
    v2, reasons, t0 = V2Client(h), [], time.monotonic()
    try:
        for start in range(0, len(order), batch):
            reasons += v2.infer_u8(imgs[order[start: start + batch]])
            if (start // batch) % 200 == 0:
                log(f"{what}: {start + batch}/{len(order)} sent, "
                    f"{sum(r == 'query_history' for r in reasons)} flagged, {time.monotonic() - t0:.0f} s")
    finally:
        v2.close()
    return reasons


# ------------------------------------------------------------------------------ benign sections


def section_benign(args: argparse.Namespace, imgs: np.ndarray, names: list[str]) -> dict[str, Any]:
    order = np.random.default_rng(0).permutation(len(imgs))[: args.n].tolist()
    t0 = time.monotonic()
    with server(server_env()) as h:
        reasons = send_stream(h, imgs, order, args.batch, "benign")
    flagged = [order[i] for i, r in enumerate(reasons) if r == "query_history"]
    positions = [order.index(i) for i in flagged]
    return {"images": len(order), "batch": args.batch, "flagged": len(flagged),
            "rate": len(flagged) / len(order), "angle_rejected": sum(r == "angle" for r in reasons),
            "flagged_images": [names[i] for i in flagged], "flagged_positions": positions,
            "nearest_earlier": [nearest_earlier(imgs, names, order, p) for p in positions],
            "seconds": round(time.monotonic() - t0, 1)}


def nearest_earlier(imgs: np.ndarray, names: list[str], order: list[int], pos: int) -> dict[str, Any]:
    """The image sent before position `pos` closest to it (mean absolute pixel difference): what
    a false positive most likely matched (Fashion-MNIST holds near-duplicates)."""
    i, prev = order[pos], np.asarray(order[:pos])
    diff = np.abs(imgs[prev].reshape(len(prev), -1).astype(np.int16) - imgs[i].reshape(1, -1).astype(np.int16))
    k = int(np.argmin(diff.mean(1)))
    return {"image": names[i], "nearest": names[int(prev[k])], "mean_abs_diff_levels": round(float(diff[k].mean()), 2),
            "max_abs_diff_levels": int(diff[k].max()), "identical_pixels": round(float((diff[k] == 0).mean()), 3)}


def section_retries(args: argparse.Namespace, imgs: np.ndarray, names: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(0)  # the same order as `benign`
    order = rng.permutation(len(imgs))[: args.n].tolist()
    rng = np.random.default_rng(1)
    n_retry = len(order) // 10
    src = rng.choice(len(order), n_retry, replace=False)  # positions retried
    events = [(float(i), order[i], False) for i in range(len(order))]
    events += [(float(p) + rng.uniform(1, 1000), order[p], True) for p in src.tolist()]
    events.sort(key=lambda e: e[0])
    stream = [e[1] for e in events]
    is_retry = [e[2] for e in events]
    t0 = time.monotonic()
    with server(server_env()) as h:
        reasons = send_stream(h, imgs, stream, args.batch, "retries")
    first_flag: dict[int, bool] = {}
    orig_flagged, retry_flagged, retry_new_flag = [], 0, []
    for idx, retry, r in zip(stream, is_retry, reasons, strict=True):
        flag = r == "query_history"
        if not retry:
            first_flag[idx] = flag
            if flag:
                orig_flagged.append(idx)
        elif flag:
            retry_flagged += 1
            if not first_flag.get(idx, False):
                retry_new_flag.append(idx)
    return {"queries": len(stream), "retries": n_retry, "originals_flagged": len(orig_flagged),
            "originals_rate": len(orig_flagged) / len(order),
            "originals_flagged_images": [names[i] for i in orig_flagged],
            "retries_flagged": retry_flagged, "retries_flagged_first_not": len(retry_new_flag),
            "retries_flagged_first_not_images": [names[i] for i in retry_new_flag],
            "seconds": round(time.monotonic() - t0, 1)}


def section_retaken(args: argparse.Namespace, imgs: np.ndarray, names: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    chosen = rng.choice(len(imgs), args.retaken, replace=False).tolist()
    queries: list[tuple[int, bool, np.ndarray]] = []
    for i in chosen:
        queries.append((i, False, imgs[i]))
        queries += [(i, True, retake(imgs[i], rng)) for _ in range(3)]
    perm = rng.permutation(len(queries)).tolist()
    queries = [queries[p] for p in perm]
    stack = np.stack([q[2] for q in queries])
    t0 = time.monotonic()
    with server(server_env()) as h:
        reasons = send_stream(h, stack, list(range(len(queries))), args.batch, "retaken")
    retakes = [(q[0], r == "query_history") for q, r in zip(queries, reasons, strict=True) if q[1]]
    firsts = [(q[0], r == "query_history") for q, r in zip(queries, reasons, strict=True) if not q[1]]
    per_image: dict[int, int] = {}
    for i, f in retakes:
        per_image[i] = per_image.get(i, 0) + int(f)
    return {"images": len(chosen), "retakes": len(retakes), "retakes_flagged": sum(f for _, f in retakes),
            "retake_rate": sum(f for _, f in retakes) / len(retakes),
            "originals_flagged": sum(f for _, f in firsts),
            "images_with_a_flagged_retake": sum(1 for v in per_image.values() if v),
            "images_all_retakes_flagged": sum(1 for v in per_image.values() if v == 3),
            "seconds": round(time.monotonic() - t0, 1)}


# ------------------------------------------------------------------------------------------ cost

# wrk Lua: every request a different body of BENCH_BODIES (lengths in BENCH_LENGTHS), each wrk
# thread starting at its own offset; the status counting of support/loadgen.py's WRK_LUA.
ROTATE_LUA = """
local threads = {}
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
function init(args)
  local f = assert(io.open(os.getenv("BENCH_BODIES"), "rb"))
  local all = f:read("*all")
  f:close()
  reqs = {}
  local pos = 1
  for len in io.lines(os.getenv("BENCH_LENGTHS")) do
    local n = tonumber(len)
    local headers = {}
    headers["Content-Type"] = "CONTENT_TYPE"
    table.insert(reqs, wrk.format("POST", nil, headers, all:sub(pos, pos + n - 1)))
    pos = pos + n
  end
  local nthreads = tonumber(os.getenv("BENCH_THREADS"))
  idx = math.floor(#reqs * tid / nthreads)
  statuses = {}
  sent = 0
end
function request()
  idx = idx % #reqs + 1
  sent = sent + 1
  return reqs[idx]
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses") or {}) do total[k] = (total[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("STATUS %d %d\\n", k, v)) end
  io.write("MISSING_RETRY_AFTER 0\\n")
end
""".replace("CONTENT_TYPE", MULTIPART)


def wrk_rotating(url: str, bodies: list[bytes], connections: int, duration_s: float, threads: int = 2) -> Any:
    with tempfile.TemporaryDirectory(prefix="dsphere-wrk-qh-") as tmp:
        body_file, lengths, lua = Path(tmp) / "bodies.bin", Path(tmp) / "lengths.txt", Path(tmp) / "rotate.lua"
        body_file.write_bytes(b"".join(bodies))
        lengths.write_text("".join(f"{len(b)}\n" for b in bodies))
        lua.write_text(ROTATE_LUA)
        env = {**os.environ, "BENCH_BODIES": str(body_file), "BENCH_LENGTHS": str(lengths),
               "BENCH_THREADS": str(threads)}
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration_s))}s",
                "--timeout", "10s", "--latency", "-s", str(lua), url]
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration_s + 120)
        if out.returncode != 0:
            raise RuntimeError(f"wrk exited with {out.returncode}: {out.stderr.strip()}")
    return parse_wrk(out.stdout)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """{labels-and-suffix: value} of metric `name` in a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


def histogram_quantile(text: str, name: str, q: float) -> tuple[float | None, int]:
    """(upper bound of the bucket holding quantile q, observations) of a histogram, from /metrics."""
    buckets = []
    for key, v in metric_samples(text, name + "_bucket").items():
        m = re.search(r'le="([^"]+)"', key)
        if m:
            buckets.append((float(m.group(1)), v))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    for le, v in buckets:
        if total and v >= q * total:
            return le, int(total)
    return None, int(total)


def cpu_seconds(h: ServerHandle) -> float:
    """User + system CPU time of the server process and its descendants so far (/proc/<pid>/stat)."""
    from support.server import descendants

    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in [h.proc.pid, *descendants(h.proc.pid)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def flush_redis(r: RedisHandle) -> None:
    import redis

    c = redis.Redis.from_url(r.url)
    c.flushall()
    c.close()


def section_cost(args: argparse.Namespace, redis_h: RedisHandle) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not found (apt-get install wrk)"}
    test = load_fashion_mnist_test(10_000)
    bodies = [multipart("file", [png_bytes(a)]) for a in test]
    warm = [multipart("file", [png_bytes(a)]) for a in load_fashion_mnist_train(1000)]
    configs = {"off": server_env(DSPHERE_QUERY_HISTORY_ACTION="off"),
               "on (in-process)": server_env(),
               "on (Redis)": server_env(DSPHERE_QUERY_HISTORY_REDIS_URL=redis_h.url)}
    runs: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        names = list(configs) if rnd % 2 == 0 else list(configs)[::-1]
        for name in names:
            if "Redis" in name:
                flush_redis(redis_h)
            with server(configs[name]) as h:
                wrk_rotating(h.url + "/classify", warm, 4, 2)
                with h.client() as c:
                    before = c.get("/metrics").text
                cpu0 = cpu_seconds(h)
                r = wrk_rotating(h.url + "/classify", bodies, args.concurrency, args.duration)
                cpu = cpu_seconds(h) - cpu0
                with h.client() as c:
                    text = c.get("/metrics").text
                    health = c.get("/healthz").json().get("query_history") or {}
            checked = sum(metric_samples(text, "dsphere_query_history_checked_total").values())
            checked -= sum(metric_samples(before, "dsphere_query_history_checked_total").values())
            repeats = sum(metric_samples(text, "dsphere_query_history_repeats_total").values())
            attacks = sum(v for k, v in metric_samples(text, "dsphere_query_history_attack_queries_total").items())
            p99, obs = histogram_quantile(text, "dsphere_query_history_lookup_seconds", 0.99)
            p50, _ = histogram_quantile(text, "dsphere_query_history_lookup_seconds", 0.50)
            row = {"config": name, "round": rnd, "detector_status": health.get("status"),
                   "detector_error": health.get("error"), "requests": r.requests, "rps": r.rps, "p50_ms": r.p50_ms,
                   "p99_ms": r.p99_ms, "non_2xx": r.non_2xx, "socket_errors": r.socket_errors,
                   "server_cpu_ms_per_request": 1e3 * cpu / max(1, r.requests),
                   "distinct_images": min(r.requests, len(bodies)), "checked": int(checked),
                   "repeats_total": int(repeats), "attack_queries_total": int(attacks),
                   "lookup_p50_bucket_s": p50, "lookup_p99_bucket_s": p99, "lookup_observations": obs}
            runs.append(row)
            log(f"cost: {name} round {rnd}: {r.rps:.0f} req/s, p99 {r.p99_ms:.1f} ms, "
                f"{r.requests} requests, {int(checked)} judged, detector {health.get('status')}, lookup p99 <= {p99}")
    mean = {n: statistics.mean(x["rps"] for x in runs if x["config"] == n) for n in configs}
    cpu_mean = {n: statistics.mean(x["server_cpu_ms_per_request"] for x in runs if x["config"] == n)
                for n in configs}
    return {"concurrency": args.concurrency, "duration_s": args.duration, "rounds": args.rounds,
            "distinct_bodies": len(bodies), "runs": runs, "mean_rps": mean, "mean_cpu_ms_per_request": cpu_mean,
            "cpu_ratio_on_in_process": cpu_mean["off"] / cpu_mean["on (in-process)"],
            "cpu_ratio_on_redis": cpu_mean["off"] / cpu_mean["on (Redis)"],
            "ratio_on_in_process": mean["on (in-process)"] / mean["off"],
            "ratio_on_redis": mean["on (Redis)"] / mean["off"]}


# ---------------------------------------------------------------------------------------- lookup


def section_lookup(args: argparse.Namespace, redis_h: RedisHandle) -> dict[str, Any]:
    from app.query_history import HistoryConfig, QueryHistory

    imgs = (load_fashion_mnist_test(10_000)[: args.lookup_calls].astype(np.float32) / 255)[:, None]
    out: dict[str, Any] = {"calls": len(imgs)}

    async def timed(cfg: HistoryConfig) -> dict[str, Any]:
        qh = QueryHistory(cfg)
        await qh.start()
        for i in range(20):  # warm-up (not stored in the timed part's images: the train set)
            await qh.judge(np.full((1, 1, 28, 28), i / 40, np.float32))
        t_new, cpu_new = [], []
        for x in imgs:
            t0, c0 = time.perf_counter(), time.thread_time()
            await qh.judge(x[None])
            t_new.append(time.perf_counter() - t0)
            cpu_new.append(time.thread_time() - c0)
        t_rep = []
        for x in imgs[:500]:
            t0 = time.perf_counter()
            await qh.judge(x[None])
            t_rep.append(time.perf_counter() - t0)
        t_b = []
        batches = load_fashion_mnist_train(64 * 50).astype(np.float32).reshape(50, 64, 1, 28, 28) / 255
        for b in batches:
            t0 = time.perf_counter()
            await qh.judge(b)
            t_b.append(time.perf_counter() - t0)
        available, error = qh.available, qh.error
        await qh.close()

        def q(t: list[float]) -> dict[str, float]:
            a = np.asarray(t) * 1e3
            return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                    "max_ms": float(a.max())}
        return {"available": available, "error": error, "new_image": q(t_new), "new_image_cpu": q(cpu_new),
                "exact_repeat": q(t_rep),
                "batch_of_64": q(t_b)}

    salt = b"bench-query-history-salt-0123456789"
    out["in_process"] = asyncio.run(timed(HistoryConfig(salt=salt)))
    flush_redis(redis_h)
    out["redis"] = asyncio.run(timed(HistoryConfig(salt=salt, redis_url=redis_h.url)))
    return out


# ---------------------------------------------------------------------------------------- memory

MEMORY_CHILD = "--memory-child"


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_child(table_mb: float, queries: int) -> None:
    """In its own process: a LocalStore's RSS growth after `queries` distinct fingerprints."""
    from app.history_store import ID_BITS, TIME_BITS, LocalStore, table_slots
    from app.query_history import HistoryConfig

    cfg = HistoryConfig()
    hashes, threshold = cfg.params.hashes, cfg.threshold
    rng = np.random.default_rng(int(table_mb))
    rss0 = rss()
    store = LocalStore(table_slots(table_mb), cfg.ttl_s, cfg.exact_capacity, threshold)
    rss1 = rss()
    every = max(1, queries // 2000)
    kept: list[tuple[int, np.ndarray, int]] = []

    async def fill() -> None:
        chunk = 10_000
        for start in range(0, queries, chunk):
            # 64-bit hashes, uniform like the fingerprinter's (splitmix64), each row descending
            block = np.sort(rng.integers(1, 2**64, (chunk, hashes), dtype=np.uint64), axis=1)[:, ::-1].copy()
            ids = rng.integers(0, 1 << ID_BITS, chunk)
            for j in range(min(chunk, queries - start)):
                await store.record(block[j], int(ids[j]))
                if (start + j) % every == 0:
                    kept.append((start + j, block[j].copy(), int(ids[j])))  # a copy: a view keeps the block

    t0 = time.monotonic()
    asyncio.run(fill())
    seconds = time.monotonic() - t0
    rss2 = rss()
    # how many of its hashes each sampled query still has in the table (tag and id match)
    tag_shift = np.uint64(ID_BITS + TIME_BITS)
    left = []
    for k, h, qid in kept:
        old = store.table[(h % store.slots).astype(np.intp)]
        ids = (old >> np.uint64(TIME_BITS)) & np.uint64((1 << ID_BITS) - 1)
        same = ((old >> tag_shift) == (h >> tag_shift)) & (ids == np.uint64(qid))
        left.append((k, int(same.sum())))
    ages = np.array([queries - 1 - k for k, _ in left])
    counts = np.array([c for _, c in left])
    deciles = []
    for d in range(10):
        sel = (ages >= d * queries / 10) & (ages < (d + 1) * queries / 10)
        if sel.any():
            deciles.append({"age_from": int(d * queries / 10), "age_to": int((d + 1) * queries / 10),
                            "mean_hashes_left": float(counts[sel].mean()),
                            "held": float((counts[sel] >= threshold).mean())})
    print(json.dumps({
        "table_mb": table_mb, "slots": int(store.slots), "table_bytes": int(store.table.nbytes), "queries": queries,
        "hashes_per_query": hashes, "threshold": threshold, "rss_before_bytes": rss0,
        "rss_after_create_bytes": rss1, "rss_after_fill_bytes": rss2, "rss_growth_bytes": rss2 - rss0,
        "rss_growth_per_query_bytes": (rss2 - rss0) / queries, "occupied_slots": store._occupied,
        "fill_seconds": round(seconds, 1), "sampled": len(left),
        "held_fraction": float((counts >= threshold).mean()), "oldest_decile_held": deciles[-1]["held"],
        "by_age": deciles}))


def section_memory(args: argparse.Namespace) -> dict[str, Any]:
    out = []
    for s in [float(v) for v in args.mem_mb.split(",") if v]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        p = subprocess.run([sys.executable, __file__, MEMORY_CHILD, str(s), str(args.mem_queries)], cwd=REPO,
                           capture_output=True, text=True, timeout=3600, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"memory child failed: {p.stderr[-2000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        log(f"memory: table {s:g} MB: RSS +{row['rss_growth_bytes'] / 2**20:.0f} MiB, "
            f"held {row['held_fraction']:.1%}, oldest decile {row['oldest_decile_held']:.1%}")
        out.append(row)
    return {"configs": out}


# ---------------------------------------------------------------------------------------- attack


def square_like(x: np.ndarray, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """A Square-like stream around x ([1, 28, 28] in [0, 1]): Square's +-eps stripes first, then
    random squares set to x +- eps (shrinking), the candidate kept 30 % of the time (fixed in
    advance: the stream is the same whatever the service answers)."""
    adv = np.clip(x + EPS * rng.choice([-1, 1], (1, 1, 28)), 0, 1).astype(np.float32)
    out = [adv]
    for i in range(n - 1):
        s = max(1, int(round(28 * np.sqrt(0.8 * 0.5 ** (i // 20)))))
        r, c = rng.integers(0, 28 - s + 1, 2)
        cand = adv.copy()
        cand[:, r:r + s, c:c + s] = np.clip(x[:, r:r + s, c:c + s] + EPS * rng.choice([-1, 1]), 0, 1)
        out.append(cand)
        if rng.random() < 0.3:
            adv = cand
    return out


def per_worker_requests(h: ServerHandle) -> dict[int, float]:
    """dsphere_requests_total per worker process (its multiprocess counter file)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out: dict[int, float] = {}
    d = h.multiproc_dir
    if d is None:
        return out
    for f in d.glob("counter_*.db"):
        pid = int(f.stem.split("_")[-1])
        for m in MultiProcessCollector._read_metrics([str(f)]).values():  # noqa: SLF001
            for s in m.samples:
                if s.name == "dsphere_requests_total":
                    out[pid] = out.get(pid, 0) + s.value
    return out


def run_attack(clients: list[V2Client], streams: list[list[np.ndarray]]) -> tuple[list[int | None], list[float]]:
    """Each stream sent whole, query by query, round-robin over `clients`: the query of its first
    detection (1-based, None: none) and the share of its queries flagged."""
    found: list[int | None] = []
    share: list[float] = []
    k = 0
    for stream in streams:
        flags = []
        for q in stream:
            flags.append(clients[k % len(clients)].infer_f32(q[None])[0] == "query_history")
            k += 1
        found.append(flags.index(True) + 1 if any(flags) else None)
        share.append(sum(flags) / len(flags))
    return found, share


def section_attack(args: argparse.Namespace, redis_h: RedisHandle) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    test = load_fashion_mnist_test(10_000)
    seeds = rng.choice(len(test), args.attack_seeds, replace=False).tolist()
    streams = [square_like(test[i][None].astype(np.float32) / 255, rng, args.attack_queries) for i in seeds]
    url = f"redis://127.0.0.1:{redis_h.port}"
    setups: dict[str, Any] = {}

    def summarize(name: str, result: tuple[list[int | None], list[float]], extra: dict[str, Any] | None = None
                  ) -> None:
        found, share = result
        det = [f for f in found if f is not None]
        setups[name] = {"queries_to_detection": found, "detected": len(det), "runs": len(found),
                        "flagged_share": share, "mean_flagged_share": float(statistics.mean(share)),
                        "median": float(statistics.median(det)) if det else None,
                        "mean": float(statistics.mean(det)) if det else None, "max": max(det) if det else None,
                        **(extra or {})}
        log(f"attack: {name}: detected {len(det)}/{len(found)}, median {setups[name]['median']}, "
            f"mean {setups[name]['mean']}, max {setups[name]['max']}, flagged {statistics.mean(share):.1%}")

    flush_redis(redis_h)
    with server(server_env()) as h:
        c = V2Client(h)
        summarize("one server (in-process)", run_attack([c], streams))
        c.close()
    with server(server_env(DSPHERE_QUERY_HISTORY_REDIS_URL=f"{url}/1")) as h:
        c = V2Client(h)
        summarize("one server (Redis)", run_attack([c], streams))
        c.close()
    with server(server_env(DSPHERE_QUERY_HISTORY_REDIS_URL=f"{url}/2"), workers=2) as h:
        c = V2Client(h, keepalive=False)  # a new connection each request: the kernel hands it to a worker
        result = run_attack([c], streams)
        c.close()
        spread = per_worker_requests(h)
        summarize("two workers, one server (Redis)", result,
                  {"requests_per_worker": sorted(spread.values(), reverse=True)})
    with ExitStack() as stack:
        env = server_env(DSPHERE_QUERY_HISTORY_REDIS_URL=f"{url}/3")
        a, b = stack.enter_context(server(env)), stack.enter_context(server(env))
        ca, cb = V2Client(a), V2Client(b)
        summarize("two replicas, one Redis", run_attack([ca, cb], streams))
        ca.close()
        cb.close()
    base = setups["one server (Redis)"]["mean"]
    for name in ("two workers, one server (Redis)", "two replicas, one Redis"):
        m = setups[name]["mean"]
        setups[name]["mean_vs_one"] = m / base if m and base else None
    return {"seeds": [f"test[{i}]" for i in seeds], "queries_per_seed": args.attack_queries, "eps": EPS,
            "setups": setups}


# ----------------------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.3f} %"


def markdown(res: dict[str, Any]) -> str:
    by_cmd: dict[str, list[str]] = {}
    for sec in SECTIONS:
        if sec in res and sec in res.get("commands", {}):
            by_cmd.setdefault(res["commands"][sec], []).append(sec)
    made = "; ".join(f"{', '.join(secs)}: `{c}`" for c, secs in by_cmd.items()) or f"`{res['command']}`"
    L = ["# Query-history detector: benign traffic and cost (#26)", "",
         f"Made by (section: command) {made}; on {res['machine']}; model {res['model']}, one uvicorn worker "
         "per server unless said, detector defaults of the section's commit (reject, threshold 15 of 50 hashes, "
         "ttl 24 h; the table 2^22 slots before DSPHERE_QUERY_HISTORY_TABLE_MB, 32 MB = 4,000,000 slots since). "
         "The commit each section measured: benign-and-cost.json, `code`.", ""]
    b = res.get("benign")
    if b:
        L += ["## Benign traffic", "", "| stream | queries | flagged (query_history) | rate |",
              "| --- | --- | --- | --- |",
              f"| {b['images']:,} images once, random order (V2 infer, {b['batch']} rows a request) | "
              f"{b['images']:,} | "
              f"{b['flagged']} | {pct(b['rate'])} |"]
        r = res.get("retries")
        if r:
            L += [f"| the same stream + 10 % exact retries: originals | {r['queries'] - r['retries']:,} | "
                  f"{r['originals_flagged']} | {pct(r['originals_rate'])} |",
                  f"| the same stream + 10 % exact retries: retries | {r['retries']:,} | {r['retries_flagged']} "
                  f"({r['retries_flagged_first_not']} whose first query was not flagged) | "
                  f"{pct(r['retries_flagged'] / r['retries'])} |"]
        t = res.get("retaken")
        if t:
            L += [f"| re-taken photos ({t['images']:,} images, 3 re-takes each: 1-pixel shift or +8 levels) | "
                  f"{t['retakes']:,} re-takes | {t['retakes_flagged']} | {pct(t['retake_rate'])} |"]
        L += ["", f"False positives of the {b['images']:,}-image stream: {', '.join(b['flagged_images']) or 'none'}."]
        for x in b.get("nearest_earlier", []):
            L.append(f"- {x['image']}: the closest image sent before it is {x['nearest']} (mean difference "
                     f"{x['mean_abs_diff_levels']} levels of 255, {x['identical_pixels']:.0%} of pixels identical)")
        if b.get("nearest_earlier"):
            L.append("")
        if r:
            L += [f"Retry stream, originals flagged: {', '.join(r['originals_flagged_images']) or 'none'}."]
        L += [""]
    elif res.get("retaken"):
        t = res["retaken"]
        L += ["## Re-taken photos", "", f"{t['retakes_flagged']} of {t['retakes']} re-takes flagged "
              f"({pct(t['retake_rate'])}).", ""]
    c = res.get("cost")
    if c and "runs" in c:
        L += ["## Cost: /classify throughput", "",
              f"wrk, {c['concurrency']} connections, {c['duration_s']} s a run, each request a different test image "
              f"(rotating through {c['distinct_bodies']:,} PNGs), {c['rounds']} rounds in alternating order, "
              "each on a fresh server.", "",
              "| detector | /healthz status | round | req/s | p50 ms | p99 ms | requests | non-2xx | inputs judged "
              "| exact repeats | lookup p99 (bucket) | server CPU ms / request |", "| --- " * 12 + "|"]
        for x in c["runs"]:
            bucket = f"<= {x['lookup_p99_bucket_s'] * 1e3:g} ms" if x["lookup_p99_bucket_s"] else ""
            L.append(f"| {x['config']} | {x['detector_status']} | {x['round']} | {x['rps']:.0f} | "
                     f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
                     f"{x['requests']} | {x['non_2xx']} | {x['checked']} | {x['repeats_total']} | {bucket} | "
                     f"{x.get('server_cpu_ms_per_request', float('nan')):.2f} |")
        L += ["", "Mean req/s: " + ", ".join(f"{k} {v:.0f}" for k, v in c["mean_rps"].items())
              + f"; on (in-process) / off = **{c['ratio_on_in_process']:.2f}x** (target >= 0.9x), "
              f"on (Redis) / off = **{c['ratio_on_redis']:.2f}x** (target >= 0.8x)."]
        if "mean_cpu_ms_per_request" in c:
            L += ["", "Server CPU time per request (user + system of the server's processes over the run; less "
                  "sensitive than req/s to the other load of a shared machine): " + ", ".join(
                      f"{k} {v:.2f} ms" for k, v in c["mean_cpu_ms_per_request"].items())
                  + f"; the throughput that CPU cost allows, on / off: {c['cpu_ratio_on_in_process']:.2f}x "
                  f"(in-process), {c['cpu_ratio_on_redis']:.2f}x (Redis; the redis-server's own CPU not counted)."]
        L += [""]
    lk = res.get("lookup")
    if lk:
        L += ["## Lookup latency (QueryHistory.judge in-process)", "",
              f"{lk['calls']:,} calls, one new test image each; 500 exact repeats; 50 batches of 64.", "",
              "| store | new image p50 / p99 / max ms | new image CPU p50 / p99 ms | exact repeat p50 / p99 ms "
              "| batch of 64 p50 / p99 ms |", "| --- | --- | --- | --- | --- |"]
        for k in ("in_process", "redis"):
            v = lk[k]
            cpu = v.get("new_image_cpu", {})
            state = "" if v["available"] else f" (store unavailable: {v['error']}; the detector stood aside)"
            L.append(f"| {k.replace('_', '-')}{state} | {v['new_image']['p50_ms']:.3f} / "
                     f"{v['new_image']['p99_ms']:.3f} / "
                     f"{v['new_image']['max_ms']:.2f} | {cpu.get('p50_ms', float('nan')):.3f} / "
                     f"{cpu.get('p99_ms', float('nan')):.3f} | {v['exact_repeat']['p50_ms']:.3f} / "
                     f"{v['exact_repeat']['p99_ms']:.3f} | {v['batch_of_64']['p50_ms']:.2f} / "
                     f"{v['batch_of_64']['p99_ms']:.2f} |")
        L.append("")
    m = res.get("memory")
    if m:
        L += ["## Memory", "",
              "A LocalStore in its own process, RSS growth after storing the queries (random distinct fingerprints of "
              "50 hashes); 'held': the share of the stored queries with at least the threshold (15) of their hashes "
              "still in the table, i.e. whose near-duplicates would still be caught.", "",
              "| DSPHERE_QUERY_HISTORY_TABLE_MB | slots | queries | RSS growth | per query | occupied slots "
              "| held (all) | held (oldest tenth) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in m["configs"]:
            L.append(f"| {x['table_mb']:g} ({x['table_bytes'] / 1e6:.0f} MB) | {x['slots']:,} | {x['queries']:,} | "
                     f"{x['rss_growth_bytes'] / 2**20:.0f} MiB ({x['rss_growth_bytes'] / 1e6:.0f} MB) | "
                     f"{x['rss_growth_per_query_bytes']:.0f} B | {x['occupied_slots']:,} | {x['held_fraction']:.1%} | "
                     f"{x['oldest_decile_held']:.1%} |")
        L.append("")
    a = res.get("attack")
    if a:
        L += ["## An attack spread over workers and replicas", "",
              f"A Square-like stream (eps {a['eps']}) on {len(a['seeds'])} test images, up to {a['queries_per_seed']} "
              "queries each (all sent), one V2 query a request, the same queries in every setup: the query of "
              "the first reason \"query_history\" and the share of the stream's queries flagged.", "",
              "| setup | detected | median | mean | max | mean vs one server (Redis) | queries flagged |",
              "| --- " * 7 + "|"]
        for name, s in a["setups"].items():
            ratio = f"{s['mean_vs_one']:.2f}x" if s.get("mean_vs_one") else ""
            flagged = f"{s['mean_flagged_share']:.1%}" if "mean_flagged_share" in s else ""
            L.append(f"| {name} | {s['detected']}/{s['runs']} | {s['median']} | "
                     f"{s['mean']:.2f} | {s['max']} | {ratio} | {flagged} |" if s["mean"] is not None else
                     f"| {name} | 0/{s['runs']} | | | | | {flagged} |")
        w = a["setups"].get("two workers, one server (Redis)", {}).get("requests_per_worker")
        if w:
            L += ["", f"Requests per worker (two workers, dsphere_requests_total of each): "
                  f"{', '.join(str(int(v)) for v in w)}."]
        L.append("")
    return "\n".join(L)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == MEMORY_CHILD:
        memory_child(float(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=70_000, help="images of the benign stream")
    ap.add_argument("--batch", type=int, default=64, help="rows per V2 infer request")
    ap.add_argument("--retaken", type=int, default=2000, help="images re-taken 3 times each")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lookup-calls", type=int, default=3000)
    ap.add_argument("--mem-queries", type=int, default=1_000_000)
    ap.add_argument("--mem-mb", default="512,500,256")
    ap.add_argument("--attack-seeds", type=int, default=12)
    ap.add_argument("--attack-queries", type=int, default=60)
    ap.add_argument("--sections", default="all")
    ap.add_argument("--out", default="docs/results/query-history",
                    help="folder of benign-and-cost.json/.md ('': none)")
    args = ap.parse_args()
    sections = SECTIONS if args.sections == "all" else tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    cmd = "python bench/bench_query_history.py " + " ".join(sys.argv[1:])
    res: dict[str, Any] = {"command": cmd.strip(), "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
                           "model": MODEL, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_all = time.monotonic()
    imgs, names = all_images() if {"benign", "retries", "retaken"} & set(sections) else (np.zeros((0, 28, 28)), [])
    with start_redis() as redis_h:
        for s in sections:
            log(f"section {s}")
            t0 = time.monotonic()
            if s == "benign":
                res[s] = section_benign(args, imgs, names)
            elif s == "retries":
                res[s] = section_retries(args, imgs, names)
            elif s == "retaken":
                res[s] = section_retaken(args, imgs, names)
            elif s == "cost":
                res[s] = section_cost(args, redis_h)
            elif s == "lookup":
                res[s] = section_lookup(args, redis_h)
            elif s == "memory":
                res[s] = section_memory(args)
            elif s == "attack":
                res[s] = section_attack(args, redis_h)
            log(f"section {s} done in {time.monotonic() - t0:.0f} s")
            res.setdefault("commands", {})[s] = cmd.strip()
            res.setdefault("code", {})[s] = code_state()
            if args.out:  # after every section: a long run leaves what it has
                write(res, Path(args.out))
    res["seconds"] = round(time.monotonic() - t_all, 1)
    md = markdown(res)
    print("\n" + md)
    if args.out:
        write(res, Path(args.out))


def code_state() -> dict[str, Any]:
    """The commit measured, and the files of app/ that differed from it (uncommitted work)."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "app_uncommitted": [line[3:] for line in git("status", "--porcelain", "app").splitlines()]}


def write(res: dict[str, Any], out: Path) -> None:
    """The JSON and the page; sections this run did not measure are kept from the file's earlier run."""
    out = out if out.is_absolute() else REPO / out
    out.mkdir(parents=True, exist_ok=True)
    old_file = out / "benign-and-cost.json"
    if old_file.exists():
        old = json.loads(old_file.read_text())
        commands = {**old.get("commands", {}), **res.get("commands", {})}
        code = {**old.get("code", {}), **res.get("code", {})}
        res = {**{k: v for k, v in old.items() if k in SECTIONS}, **res, "commands": commands, "code": code}
    (out / "benign-and-cost.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "benign-and-cost.md").write_text(markdown(res) + "\n")


if __name__ == "__main__":
    main()
