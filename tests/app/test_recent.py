"""The last minutes from the service's own counters: RecentCounters (app/recent.py) on a
registry and a clock of the test's own, and GET /stats through the app."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from app.metrics import Metrics
from app.recent import RecentCounters
from app.verdict import Verdicts
from support.fake_store import CLASS_NAMES, prototype
from support.fashion_mnist import png_bytes

NAMES = ["cat", "dog", "fox"]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def verdicts(labels: list[int], accepted: list[bool]) -> Verdicts:
    n = len(labels)
    return Verdicts(np.array(labels, np.int64), np.zeros(n), np.ones(n), np.array(accepted), np.ones(n),
                    np.ones((n, 3)))


def classify(m: Metrics, labels: list[int], accepted: list[bool], endpoint: str = "/classify",
             status: str = "200") -> None:
    m.requests.labels(endpoint, status).inc()
    if status == "200":
        m.observe_verdicts("model", "1", NAMES, verdicts(labels, accepted))


def test_intervals_and_totals_are_differences_of_the_counters() -> None:
    m, clock = Metrics(CollectorRegistry()), Clock()
    recent = RecentCounters(m, window_s=60, step_s=10, clock=clock)
    classify(m, [0], [True])  # before the first reading: not in the window
    recent.sample()
    clock.t += 10
    classify(m, [0, 1], [True, False], endpoint="/classify/batch")
    classify(m, [2], [False], endpoint="/explain")
    m.requests.labels("/healthz", "200").inc()  # not a classifying endpoint
    recent.sample()
    clock.t += 10
    classify(m, [], [], status="415")
    recent.sample()
    clock.t += 4
    classify(m, [1], [True], endpoint="/v2/models/{name}/infer")

    s = recent.stats(["dog", "cat"])
    assert (s.window_s, s.covered_s) == (60, 24)
    assert (s.requests, s.errors, s.classified, s.rejected) == (4, 1, 4, 2)
    assert s.rejection_ratio == 0.5
    assert [(c.class_name, c.accepted, c.rejected) for c in s.per_class] == [
        ("dog", 1, 1), ("cat", 1, 0), ("fox", 0, 1)]  # the served model's order first, then the others
    assert [(i.seconds_ago, i.duration_s, i.requests, i.errors, i.classified, i.rejected) for i in s.intervals] == [
        (14, 10, 2, 0, 3, 2), (4, 10, 1, 1, 0, 0), (0, 4, 1, 0, 1, 0)]


def test_readings_older_than_the_window_are_forgotten() -> None:
    m, clock = Metrics(CollectorRegistry()), Clock()
    recent = RecentCounters(m, window_s=30, step_s=10, clock=clock)
    for _ in range(6):
        recent.sample()
        classify(m, [0], [False])
        clock.t += 10
    s = recent.stats()
    assert s.covered_s == 30 and len(s.intervals) == 3
    assert (s.classified, s.rejected, s.rejection_ratio) == (3, 3, 1.0)


def test_nothing_classified_has_no_rejection_ratio() -> None:
    s = RecentCounters(Metrics(CollectorRegistry()), clock=Clock()).stats(NAMES)
    assert (s.covered_s, s.requests, s.classified, s.rejection_ratio, s.intervals) == (0, 0, 0, None, [])
    assert [(c.class_name, c.accepted, c.rejected) for c in s.per_class] == [(n, 0, 0) for n in NAMES]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_stats_endpoint_counts_what_the_service_classified(make_client, anyio_backend: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    async with make_client() as c:
        for img in (prototype(3), prototype(3), noise):
            await c.post("/classify", files={"file": ("x.png", png_bytes(img), "image/png")})
        await c.post("/classify", content=b"junk", headers={"content-type": "image/png"})
        r = await c.get("/stats")
    assert r.status_code == 200, r.text
    s = r.json()
    assert (s["requests"], s["errors"], s["classified"], s["rejected"]) == (4, 1, 3, 1)
    assert s["rejection_ratio"] == pytest.approx(1 / 3)
    rows = {row["class_name"]: (row["accepted"], row["rejected"]) for row in s["per_class"]}
    assert [row["class_name"] for row in s["per_class"]][:10] == CLASS_NAMES
    assert rows[CLASS_NAMES[3]] == (2, 0) and sum(r for _, r in rows.values()) == 1


def test_a_worker_booting_late_counts_from_the_servers_start() -> None:
    """Under gunicorn the counters are every worker's, zero at the server's start: a worker that takes its
    first reading after another served requests still counts those (and one started long ago does not)."""
    m, clock = Metrics(CollectorRegistry()), Clock()
    started = clock.t
    classify(m, [0, 1, 2], [True, False, True])  # served by another worker before this one booted
    clock.t += 2
    late = RecentCounters(m, window_s=60, clock=clock, counters_zero_at=started)
    late.sample()
    classify(m, [0], [True])
    s = late.stats(NAMES)
    assert (s.covered_s, s.requests, s.classified, s.rejected) == (2, 2, 4, 1)

    clock.t += 100  # the server's start left the window: a replacement worker starts its window now
    replaced = RecentCounters(m, window_s=60, clock=clock, counters_zero_at=started)
    replaced.sample()
    classify(m, [1], [False])
    s = replaced.stats(NAMES)
    assert (s.covered_s, s.requests, s.classified, s.rejected) == (0, 1, 1, 1)
