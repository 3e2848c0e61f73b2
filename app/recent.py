"""The last minutes of the service, from its own counters: what GET /stats answers (the page's
live panel).

Every `step_s` seconds `run` reads the counters that GET /metrics exports
(dsphere_requests_total, dsphere_classifications_total and
dsphere_query_history_attack_queries_total; every worker's in multiprocess mode)
into a ring of readings that covers `window_s`. An answer subtracts the oldest reading of the
window from one taken now (and each reading from the next, for the intervals). Counters only
grow, so an interval counts exactly what happened in it, whoever polls and how often.

Under gunicorn the counters are every worker's and start at zero with the server (gunicorn.conf.py
empties the metrics directory and records the moment in SERVER_STARTED_ENV), not with the worker:
a worker that boots after another has served requests, or replaces a dead one, takes that zero as
its window's first reading while it lies inside the window, so /stats answers the same whichever
worker serves it.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.metrics import Metrics
from app.schemas import ClassCounts, RecentInterval, RecentStats

# The routes that take inputs to classify (route templates, the `endpoint` label).
CLASSIFYING_ENDPOINTS = frozenset({"/classify", "/classify/batch", "/explain", "/v2/models/{name}/infer"})
WINDOW_S = 300.0
STEP_S = 10.0
# time.monotonic() (one clock for every process of the host) when the server's counters were zero
SERVER_STARTED_ENV = "DSPHERE_SERVER_STARTED_MONOTONIC"


def server_started() -> float | None:
    """When the counters of a multi-worker server were zero (set by gunicorn.conf.py), else None."""
    try:
        return float(os.environ[SERVER_STARTED_ENV])
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class Reading:
    """The counters at time `t` (seconds, monotonic), summed over models and versions."""

    t: float
    requests: float  # to CLASSIFYING_ENDPOINTS
    errors: float  # of those, answered 4xx or 5xx
    by_class: dict[tuple[str, str], float]  # (class_name, verdict) -> inputs
    attack_queries: float = 0.0  # the query-history detector's attack queries (rejected or flagged)

    def since(self, earlier: Reading) -> Reading:
        """What happened between `earlier` and this reading (its `t`: the duration)."""
        keys = self.by_class.keys() | earlier.by_class.keys()
        return Reading(
            self.t - earlier.t,
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            {k: self.by_class.get(k, 0.0) - earlier.by_class.get(k, 0.0) for k in keys},
            self.attack_queries - earlier.attack_queries,
        )

    def count(self, verdict: str | None = None) -> int:
        return round(sum(n for (_, v), n in self.by_class.items() if verdict in (None, v)))


def read_counters(metrics: Metrics, t: float) -> Reading:
    values = metrics.counter_values("dsphere_requests", "dsphere_classifications",
                                    "dsphere_query_history_attack_queries")
    requests = errors = 0.0
    for labels, n in values["dsphere_requests"]:
        if labels.get("endpoint") in CLASSIFYING_ENDPOINTS:
            requests += n
            errors += n if labels.get("status", "").startswith(("4", "5")) else 0.0
    by_class: dict[tuple[str, str], float] = collections.defaultdict(float)
    for labels, n in values["dsphere_classifications"]:
        by_class[(labels.get("class_name", ""), labels.get("verdict", ""))] += n
    attacks = sum(n for _, n in values["dsphere_query_history_attack_queries"])
    return Reading(t, requests, errors, dict(by_class), attacks)


class RecentCounters:
    def __init__(self, metrics: Metrics, window_s: float = WINDOW_S, step_s: float = STEP_S,
                 clock: Callable[[], float] = time.monotonic, counters_zero_at: float | None = None) -> None:
        """`counters_zero_at`: a time (on `clock`) at which every counter was zero, e.g. the start of a
        multi-worker server (server_started()); None: this process's own first reading is the start."""
        self.metrics = metrics
        self.window_s = window_s
        self.step_s = step_s
        self._clock = clock
        self._readings: collections.deque[Reading] = collections.deque()
        self._zero_at = counters_zero_at

    def sample(self) -> None:
        """Keep a reading of now; forget those that fell out of the window."""
        now = self._clock()
        if not self._readings and self._zero_at is not None and now - self.window_s <= self._zero_at <= now:
            self._readings.append(Reading(self._zero_at, 0.0, 0.0, {}))
        self._readings.append(read_counters(self.metrics, now))
        while self._readings and self._readings[0].t < now - self.window_s:
            self._readings.popleft()

    async def run(self) -> None:
        """Sample every step_s until cancelled (started and cancelled by the app's lifespan, which takes
        the first reading itself: a task runs only once the loop gets to it, and requests that never
        suspend, e.g. with an inline inference, would otherwise all come before it)."""
        while True:
            await asyncio.sleep(self.step_s)
            self.sample()

    def stats(self, class_names: Sequence[str] = ()) -> RecentStats:
        """The window up to now; `class_names` (the served model's) are listed first, even at zero."""
        now = read_counters(self.metrics, self._clock())
        kept = [r for r in self._readings if r.t >= now.t - self.window_s]
        points = [*kept, now] if kept else [now]
        total = now.since(points[0])
        intervals = []
        for a, b in zip(points, points[1:], strict=False):
            if b.t > a.t:
                d = b.since(a)
                intervals.append(RecentInterval(seconds_ago=now.t - b.t, duration_s=d.t, requests=round(d.requests),
                                                errors=round(d.errors), classified=d.count(),
                                                rejected=d.count("reject"),
                                                attack_queries=round(d.attack_queries)))
        classified, rejected = total.count(), total.count("reject")
        return RecentStats(
            window_s=self.window_s,
            covered_s=total.t,
            requests=round(total.requests),
            errors=round(total.errors),
            classified=classified,
            rejected=rejected,
            rejection_ratio=rejected / classified if classified else None,
            attack_queries=round(total.attack_queries),
            per_class=_per_class(total, class_names),
            intervals=intervals,
        )


def _per_class(total: Reading, class_names: Sequence[str]) -> list[ClassCounts]:
    seen = sorted({name for name, _ in total.by_class} - set(class_names))
    rows = []
    for name in [*class_names, *seen]:
        accepted = round(total.by_class.get((name, "accept"), 0.0))
        rejected = round(total.by_class.get((name, "reject"), 0.0))
        if name in class_names or accepted or rejected:
            rows.append(ClassCounts(class_name=name, accepted=accepted, rejected=rejected))
    return rows
