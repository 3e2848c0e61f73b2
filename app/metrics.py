"""Prometheus metrics on a registry passed in (never the global one).

Names and labels are a contract (dashboards, alerts):
  dsphere_classifications_total{model,version,class_name,verdict}  counter
  dsphere_angle_degrees{model,version,verdict}                     histogram, buckets over 0-180
  dsphere_request_duration_seconds{endpoint}                        histogram
  dsphere_requests_total{endpoint,status}                           counter
  dsphere_inference_batch_size                                      histogram
  dsphere_queue_depth                                               gauge
  dsphere_model_info{model,version,sha256,provider}                 gauge (1 for the served version)
  dsphere_inference_runtime_info{model,version,backend,precision,requested_backend,requested_precision,
                                 cpu_features,fallback}             gauge (1 for what runs the served version)
  the query-history detector (app/query_history.py):
  dsphere_query_history_checked_total                               counter (inputs judged against the history)
  dsphere_query_history_attack_queries_total{action}                counter (action: reject or flag)
  dsphere_query_history_repeats_total                               counter (exact repeats: no evidence)
  dsphere_query_history_lookup_seconds                              histogram (one request's judgement)
  dsphere_query_history_store_errors_total                          counter (the shared store failed)
  dsphere_query_history_store_up{store}                             gauge (1: judged; 0: per-input verdict only)
  dsphere_query_history_store_entries{store}                        gauge (occupied slots of the table)
  dsphere_query_history_store_bytes{store}                          gauge (the table's memory)

`endpoint` is the route template (e.g. "/v2/models/{name}/infer"), "<mount>/{path}" for the
static files (e.g. "/assets/page/{path}"), "unmatched" otherwise.
With PROMETHEUS_MULTIPROC_DIR set (several workers), values live in that directory
and `render` aggregates every process with a MultiProcessCollector.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app.runtimes import RuntimeInfo
from app.verdict import Verdicts

ANGLE_BUCKETS = (5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 90, 105, 120, 135, 150, 165, 180)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.multiprocess = multiprocess_dir() is not None
        self.classifications = Counter(
            "dsphere_classifications_total",
            "Classified inputs by predicted class and verdict.",
            ["model", "version", "class_name", "verdict"],
            registry=registry,
        )
        self.angle = Histogram(
            "dsphere_angle_degrees",
            "Geodesic angle (degrees) between an input's feature and its predicted class weight.",
            ["model", "version", "verdict"],
            buckets=ANGLE_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "dsphere_request_duration_seconds",
            "HTTP request duration by route template.",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "dsphere_requests_total",
            "HTTP requests by route template and status code.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "dsphere_inference_batch_size",
            "Rows per inference call of the micro-batcher.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "dsphere_queue_depth",
            "Requests waiting in the micro-batcher queue.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "dsphere_model_info",
            "1 for the model version being served.",
            ["model", "version", "sha256", "provider"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._model_info = _InfoGauge(self.model_info, self.multiprocess)
        self.runtime_info = Gauge(
            "dsphere_inference_runtime_info",
            "1 for the backend and precision running the served version; fallback says why a requested path is not.",
            ["model", "version", "backend", "precision", "requested_backend", "requested_precision", "cpu_features",
             "fallback"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._runtime_info = _InfoGauge(self.runtime_info, self.multiprocess)
        self.history = HistoryMetrics(registry)
        self._bound: dict[Any, Any] = {}  # children bound once per label set: labels() costs more than an update

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One HTTP request: dsphere_request_duration_seconds and dsphere_requests_total."""
        bound = self._bound.get(endpoint)
        if bound is None:
            bound = self._bound[endpoint] = (self.request_duration.labels(endpoint), dict[int, Any]())
        duration, by_status = bound  # the histogram child, and the counter child of each status seen
        duration.observe(seconds)
        counter = by_status.get(status)
        if counter is None:
            counter = by_status[status] = self.requests.labels(endpoint, str(status))
        counter.inc()

    def set_model(self, model: str, version: str, sha256: str, provider: str) -> None:
        self._model_info.set(model, version, sha256, provider)

    def set_runtime(self, model: str, version: str, info: RuntimeInfo) -> None:
        self._runtime_info.set(model, version, info.backend, info.precision, info.requested_backend,
                               info.requested_precision, ",".join(info.cpu_features), info.fallback or "")

    def observe_verdicts(self, model: str, version: str, class_names: list[str], v: Verdicts) -> None:
        per_verdict = self._bound
        for label, angle, verdict in zip(v.labels.tolist(), v.angles_deg.tolist(), v.names(), strict=True):
            key = (model, version, class_names[label], verdict)
            bound = per_verdict.get(key)
            if bound is None:
                bound = per_verdict[key] = (self.classifications.labels(*key),
                                            self.angle.labels(model, version, verdict))
            bound[0].inc()
            bound[1].observe(angle)

    def _collected(self) -> CollectorRegistry:
        """What /metrics exports: this registry, or every worker's values in multiprocess mode."""
        if self.multiprocess:
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return reg
        return self.registry

    def render(self) -> bytes:
        return generate_latest(self._collected())

    def counter_values(self, *names: str) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Each label set's value of the counters `names` (e.g. "dsphere_requests"), as /metrics exports them."""
        out: dict[str, list[tuple[dict[str, str], float]]] = {n: [] for n in names}
        for family in self._collected().collect():
            if family.name in out:
                out[family.name] += [(dict(s.labels), s.value) for s in family.samples
                                     if s.name == f"{family.name}_total"]
        return out


class HistoryMetrics:
    """The query-history detector's metrics (app/query_history.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checked = Counter(
            "dsphere_query_history_checked_total", "Inputs judged against the query history.", registry=registry)
        self.attacks = Counter(
            "dsphere_query_history_attack_queries_total",
            "Inputs the query history judged attack queries, by the action taken (reject or flag).",
            ["action"], registry=registry)
        self.repeats = Counter(
            "dsphere_query_history_repeats_total", "Exact repeats of earlier inputs (no evidence).", registry=registry)
        self.lookup = Histogram(
            "dsphere_query_history_lookup_seconds", "Time to judge one request's inputs against the query history.",
            buckets=LOOKUP_BUCKETS, registry=registry)
        self.errors = Counter(
            "dsphere_query_history_store_errors_total", "Query-history store operations that failed.",
            registry=registry)
        self.up = Gauge(
            "dsphere_query_history_store_up",
            "1 while the query history judges inputs; 0 while its store is unreachable (per-input verdict only).",
            ["store"], registry=registry, multiprocess_mode="livemin")
        self.entries = Gauge(
            "dsphere_query_history_store_entries", "Occupied slots of the query-history table.", ["store"],
            registry=registry, multiprocess_mode="livemax")
        self.bytes = Gauge(
            "dsphere_query_history_store_bytes", "Memory of the query-history table, bytes.", ["store"],
            registry=registry, multiprocess_mode="livemax")

        # Both actions exported from the start, at 0: rates and the alert see "no attack", not "no data".
        self._attacks: dict[str, Any] = {action: self.attacks.labels(action) for action in ("reject", "flag")}
        self._up: dict[str, Any] = {}

    def observe(self, checked: int, attacks: int, repeats: int, action: str, seconds: float) -> None:
        if checked:
            self.checked.inc(checked)
            self.lookup.observe(seconds)
        if attacks:
            child = self._attacks.get(action)
            if child is None:
                child = self._attacks[action] = self.attacks.labels(action)
            child.inc(attacks)
        if repeats:
            self.repeats.inc(repeats)

    def set_up(self, store: str, up: bool) -> None:
        """dsphere_query_history_store_up{store}, its child bound once."""
        child = self._up.get(store)
        if child is None:
            child = self._up[store] = [self.up.labels(store), None]
        if child[1] is not up:  # written when it changes (this process is the only writer of its value)
            child[0].set(1 if up else 0)
            child[1] = up


class _InfoGauge:
    """An info gauge: 1 for the current label set; the previous set removed (set to 0 with several
    processes, where `livemax` keeps the highest value any live process wrote)."""

    def __init__(self, gauge: Gauge, multiprocess: bool) -> None:
        self.gauge, self.multiprocess = gauge, multiprocess
        self.labels: tuple[str, ...] | None = None

    def set(self, *labels: str) -> None:
        if self.labels is not None and self.labels != labels:
            if self.multiprocess:
                self.gauge.labels(*self.labels).set(0)
            else:
                self.gauge.remove(*self.labels)
        self.gauge.labels(*labels).set(1)
        self.labels = labels
