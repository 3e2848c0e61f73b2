"""Several worker processes (uvicorn --workers 2, gunicorn -k uvicorn.workers.UvicornWorker -w 2)
with PROMETHEUS_MULTIPROC_DIR: /metrics must aggregate every worker.

200 classify requests (Fashion-MNIST test images and uniform noise, which the model mostly
rejects) on fresh connections from 8 threads, so the kernel spreads them over the workers. The
per-worker value files in the multiprocess directory show which worker PID served how many;
then /metrics, scraped several times (each scrape may land on another worker), must every time
report exactly the clients' verdict counts: dsphere_classifications_total summed by verdict
(so the rejection ratio Prometheus computes equals the clients' ratio) and the request count
in dsphere_angle_degrees_count.

The state each process keeps, under gunicorn as the image and `make serve` run it (gunicorn.conf.py):
GET /stats (the page's recent counters) answers every worker's requests whichever worker answers;
POST /admin/reload, received by one worker, is followed by every worker (DSPHERE_SERVED_MODEL_FILE);
the query history is one for both workers (DSPHERE_QUERY_HISTORY_SHARED_DIR): an image sent again
to the other worker is an exact repeat.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from support.bundled import BUNDLED_STORE, MODEL_NAME
from support.fashion_mnist import fashion_pngs, png_bytes
from support.server import ServerHandle
from tests.reliability.conftest import ADMIN_TOKEN, BUNDLED_VERSION

WORKERS = 2
N_REAL = 100
N_NOISE = 100
THREADS = 8
SCRAPES = 6


def uploads() -> list[bytes]:
    noise = np.random.default_rng(3).integers(0, 256, (N_NOISE, 28, 28), dtype=np.uint8)
    return fashion_pngs(N_REAL) + [png_bytes(x) for x in noise]


def classify_all(srv: ServerHandle, pngs: list[bytes]) -> list[dict[str, Any]]:
    def one(png: bytes) -> dict[str, Any]:
        # a new connection per request: each one is accepted by whichever worker is free
        with srv.client(headers={"Connection": "close"}) as c:
            r = c.post("/classify", files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, pngs))


def per_worker(mp_dir: Path, metric: str, **labels: str) -> dict[int, float]:
    """Sum of `metric` samples (matching labels) in each worker's own counter file."""
    out: dict[int, float] = {}
    for f in mp_dir.glob("counter_*.db"):
        pid = int(re.fullmatch(r"counter_(\d+)\.db", f.name).group(1))  # type: ignore[union-attr]
        out[pid] = sum(
            s.value
            for fam in MultiProcessCollector.merge([str(f)])
            for s in fam.samples
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
        )
    return out


def scrape(srv: ServerHandle) -> dict[str, list[Any]]:
    with srv.client(headers={"Connection": "close"}) as c:
        r = c.get("/metrics")
    assert r.status_code == 200
    samples: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def total(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize("launcher", ["uvicorn", "gunicorn"])
def test_metrics_aggregate_all_workers(launcher: str, tmp_path: Path,
                                       server_factory: Callable[..., ServerHandle]) -> None:
    mp_dir = tmp_path / "prom-multiproc"
    mp_dir.mkdir()
    (mp_dir / "counter_1.db").write_bytes(b"stale file of an earlier run")  # must be emptied at start
    srv = server_factory({"PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}, WORKERS, server=launcher)
    workers = srv.worker_pids()
    assert len(workers) == WORKERS, f"expected {WORKERS} worker processes, found {workers}"
    assert not (mp_dir / "counter_1.db").exists()

    got = classify_all(srv, uploads())
    seen = Counter((g["class_name"], g["verdict"]) for g in got)
    by_verdict = Counter(g["verdict"] for g in got)
    n = len(got)
    assert {g["model"]["version"] for g in got} == {BUNDLED_VERSION}
    assert 0 < by_verdict["reject"] < n, by_verdict  # both verdicts occur: the ratio is informative

    served = per_worker(mp_dir, "dsphere_classifications_total")
    busy = {pid: v for pid, v in served.items() if v > 0}
    assert set(busy) <= set(workers), (busy, workers)
    assert sum(busy.values()) == n
    assert len(busy) >= 2, f"all {n} requests were served by one worker: {busy}"

    for _ in range(SCRAPES):
        m = scrape(srv)
        labels = {"model": MODEL_NAME, "version": BUNDLED_VERSION}
        for (cls, verdict), count in seen.items():
            assert total(m, "dsphere_classifications_total", class_name=cls, verdict=verdict, **labels) == count
        assert total(m, "dsphere_classifications_total") == n
        rejected = total(m, "dsphere_classifications_total", verdict="reject")
        assert rejected / total(m, "dsphere_classifications_total") == by_verdict["reject"] / n
        for verdict, count in by_verdict.items():
            assert total(m, "dsphere_angle_degrees_count", verdict=verdict, **labels) == count
        assert total(m, "dsphere_angle_degrees_count") == n
        assert total(m, "dsphere_requests_total", endpoint="/classify", status="200") == n
        assert total(m, "dsphere_model_info", version=BUNDLED_VERSION) == 1  # livemax over the workers
        assert total(m, "dsphere_queue_depth") == 0  # livesum

    scraped_by = per_worker(mp_dir, "dsphere_requests_total", endpoint="/metrics")
    print(f"\n[multiworker] {launcher}: classify requests per worker pid {dict(sorted(busy.items()))}, "
          f"/metrics scrapes per worker {dict(sorted(scraped_by.items()))}, rejected {by_verdict['reject']}/{n}, "
          f"VmRSS of all processes {srv.rss_bytes() / 2**20:.0f} MiB")


def per_worker_gauge(mp_dir: Path, metric: str, **labels: str) -> dict[int, float]:
    """Each live worker's own value of a livemax gauge (its gauge_livemax_<pid>.db file)."""
    out: dict[int, float] = {}
    for f in mp_dir.glob("gauge_livemax_*.db"):
        pid = int(re.fullmatch(r"gauge_livemax_(\d+)\.db", f.name).group(1))  # type: ignore[union-attr]
        out[pid] = sum(s.value for fam in MultiProcessCollector.merge([str(f)]) for s in fam.samples
                       if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()))
    return out


def test_state_of_each_worker_is_the_servers(tmp_path: Path, server_factory: Callable[..., ServerHandle]) -> None:
    """gunicorn, two workers: /stats, a reload and the query history are the server's, not one worker's."""
    other = sorted(p.name for p in (BUNDLED_STORE / MODEL_NAME).iterdir() if (p / "manifest.json").exists()
                   and p.name != BUNDLED_VERSION)[-1]
    srv = server_factory({"DSPHERE_ADMIN_TOKEN": ADMIN_TOKEN}, WORKERS, server="gunicorn")
    workers = srv.worker_pids()
    assert len(workers) == WORKERS
    mp_dir = srv.multiproc_dir
    assert mp_dir is not None

    # /stats: every worker's classifications, whichever worker answers
    pngs = fashion_pngs(60)
    got = classify_all(srv, pngs)
    served = {pid: v for pid, v in per_worker(mp_dir, "dsphere_classifications_total").items() if v > 0}
    assert len(served) >= 2, f"all requests were served by one worker: {served}"
    for _ in range(SCRAPES):
        with srv.client(headers={"Connection": "close"}) as c:
            stats = c.get("/stats").json()
        assert stats["classified"] == len(got) and stats["requests"] == len(got), stats
        assert stats["rejected"] == sum(g["verdict"] == "reject" for g in got)

    # the query history: the same images again, on fresh connections, are exact repeats whichever worker
    # judged them first (one history table for the host)
    classify_all(srv, pngs[:30])
    m = scrape(srv)
    assert total(m, "dsphere_query_history_checked_total") == len(pngs) + 30
    assert total(m, "dsphere_query_history_repeats_total") == 30

    # POST /admin/reload reaches one worker; every worker follows it within a second or two
    with srv.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
        r = c.post("/admin/reload", json={"version": other})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while True:
        info = per_worker_gauge(mp_dir, "dsphere_model_info", version=other)
        if len(info) >= WORKERS and all(v == 1 for v in info.values()):
            break
        assert time.monotonic() < deadline, f"not every worker serves {other}: {info}"
        time.sleep(0.1)
    answers = classify_all(srv, fashion_pngs(100)[60:])
    assert {a["model"]["version"] for a in answers} == {other}
    assert total(scrape(srv), "dsphere_model_info", version=BUNDLED_VERSION) == 0
