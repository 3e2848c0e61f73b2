"""The real service + a real Prometheus on loopback, with the repository's rules.

1. `uvicorn app.main:app` (subprocess) serves the bundled default model
   (model_store/fashion-mnist-baseline + the Fashion-MNIST test images) when both exist,
   else the app tests' fixture model (support/fake_store.py: prototypes are accepted,
   uniform noise rejected).
2. Warm-up: every image is sent once BEFORE Prometheus starts, so every
   dsphere_classifications_total series the measured traffic touches already exists,
   with the same count, at Prometheus' first scrape.
3. /usr/bin/prometheus runs monitoring/prometheus.yml, derived only in its target
   (static 127.0.0.1:<port> instead of DNS discovery) and intervals (1s), with the same
   rule files.
4. Measured traffic: every image once more; the client counts verdicts.
5. Every dashboard panel query returns data, and the rejection-ratio recording rules equal
   the client's ratio (overall and per class).

Why the equality is exact: all series come from one target, so they share scrape
timestamps; each series' first sample in the rule's window is its warm-up value and the
window's increase is exactly the measured traffic. rate() then scales every series'
increase by the SAME extrapolation factor (no series starts at zero and the warm-up value
equals the measured increase, so the "extrapolate to zero" cap never applies), which
cancels in the ratio of sums. Only float rounding remains (compared to 1e-9).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.bundled import MODEL_NAME

from .deploy_helpers import (
    API_JOB,
    FASHION_MNIST_DIR,
    REPO,
    dashboard,
    dashboard_queries,
    derived_prometheus_config,
    fashion_mnist_test,
    free_port,
    png_bytes,
    tool,
    wait_for,
)

httpx = pytest.importorskip("httpx")
np = pytest.importorskip("numpy")

PROMETHEUS = tool("prometheus")
FASHION_MNIST = FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: apt install prometheus)"),
    pytest.mark.timeout(180),
]


def _bundled_store() -> Path | None:
    d = REPO / "model_store" / MODEL_NAME
    ok = (
        any((v / "manifest.json").is_file() and (v / "model.onnx").is_file() for v in d.glob("*"))
        if d.is_dir()
        else False
    )
    return REPO / "model_store" if ok and FASHION_MNIST.is_file() else None


def _model_store_and_images(tmp: Path) -> tuple[Path, list[bytes]]:
    rng = np.random.default_rng(1234)
    noise = [png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(8)]
    checker = (np.indices((28, 28)).sum(axis=0) % 2 * 255).astype(np.uint8)
    odd = [png_bytes(checker), png_bytes(np.full((28, 28), 255, np.uint8))]  # more out-of-distribution inputs
    store = _bundled_store()
    if store is not None:
        real, _ = fashion_mnist_test(32)
        return store, [png_bytes(x) for x in real] + noise + odd
    from support import fake_store

    store = tmp / "store"
    fake_store.write_version(store, "1")
    return store, [png_bytes(fake_store.prototype(k)) for k in range(fake_store.K)] + noise


@dataclass
class Stack:
    api: str
    prom: str
    client: Any
    model: str = ""
    version: str = ""
    measured: Counter = field(default_factory=Counter)  # (class_name, verdict) -> n

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.client.get(f"{self.prom}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None


def _classify(client: Any, api: str, images: list[bytes]) -> Counter:
    seen: Counter = Counter()
    for png in images:
        r = client.post(f"{api}/classify", files={"file": ("x.png", png, "image/png")}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["verdict"] in ("accept", "reject")
        seen[(body["class_name"], body["verdict"])] += 1
    return seen


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("deploy-integration")
    store, images = _model_store_and_images(tmp)
    api_port, prom_port = free_port(), free_port()
    api, prom = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("DSPHERE_") and k.lower() != "prometheus_multiproc_dir"
    }
    env.update(
        DSPHERE_MODEL_STORE=str(store),
        DSPHERE_MODEL_NAME=MODEL_NAME,
        DSPHERE_MODEL_VERSION="latest",
        DSPHERE_PROVIDERS="CPUExecutionProvider",
        DSPHERE_INTRA_OP_THREADS="1",
        DSPHERE_LOG_LEVEL="warning",
        # The traffic below repeats its images: without the result cache each one reaches the model,
        # so the engine's panels (batch size) have data. The query history still judges every input.
        DSPHERE_QUERY_HISTORY_RESULT_CACHE="0",
        OMP_NUM_THREADS="1",
    )
    api_log, prom_log = tmp / "api.log", tmp / "prometheus.log"
    api_proc = prom_proc = None
    client = httpx.Client(trust_env=False)  # loopback only: never through an HTTP(S)_PROXY
    try:
        with api_log.open("wb") as log:
            api_proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(api_port),
                 "--log-level", "warning"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def ready() -> bool:
            assert api_proc is not None and api_proc.poll() is None, "uvicorn exited:\n" + _log_tail(api_log)
            return client.get(f"{api}/readyz", timeout=2).status_code == 200

        try:
            wait_for("the service to be ready", ready, timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_log_tail(api_log)}") from None

        # --- warm-up, before Prometheus exists: creates every series the measured traffic touches
        warm = _classify(client, api, images)

        config = derived_prometheus_config(f"127.0.0.1:{api_port}", tmp)
        with prom_log.open("wb") as log:
            prom_proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--web.enable-lifecycle",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        s = Stack(api=api, prom=prom, client=client)
        n_warm = sum(warm.values())

        def scraped_warmup() -> bool:
            assert prom_proc is not None and prom_proc.poll() is None, "prometheus exited:\n" + _log_tail(prom_log)
            return s.scalar("sum(dsphere_classifications_total)") == n_warm

        wait_for("Prometheus to scrape the warm-up state", scraped_warmup, timeout=45)
        info = s.query("dsphere_model_info == 1")
        s.model, s.version = info[0]["metric"]["model"], info[0]["metric"]["version"]

        # --- measured traffic: the same images once more
        s.measured = _classify(client, api, images)
        assert s.measured == warm, "the service is not deterministic on identical inputs"
        total = n_warm + sum(s.measured.values())
        wait_for("Prometheus to scrape the measured traffic",
              lambda: s.scalar("sum(dsphere_classifications_total)") == total, timeout=30)  # fmt: skip
        yield s
    except BaseException:
        sys.stderr.write(f"--- api log\n{_log_tail(api_log)}\n--- prometheus log\n{_log_tail(prom_log)}\n")
        raise
    finally:
        client.close()
        _stop(prom_proc)
        _stop(api_proc)


def _expected_ratio(measured: Counter, cls: str | None = None) -> float:
    rej = sum(n for (c, v), n in measured.items() if v == "reject" and cls in (None, c))
    tot = sum(n for (c, _), n in measured.items() if cls in (None, c))
    return rej / tot


def test_traffic_had_both_verdicts(stack: Stack) -> None:
    verdicts = {v for (_, v) in stack.measured}
    assert verdicts == {"accept", "reject"}, stack.measured


def test_target_up_with_job_label(stack: Stack) -> None:
    assert stack.scalar(f'up{{job="{API_JOB}"}}') == 1.0


@pytest.mark.parametrize("rule", ["dsphere:rejection_ratio:rate5m", "dsphere:rejection_ratio:rate1h"])
def test_rejection_ratio_rule_equals_client_ratio(stack: Stack, rule: str) -> None:
    expected = _expected_ratio(stack.measured)
    sel = f'{rule}{{model="{stack.model}",version="{stack.version}"}}'

    def close() -> float | None:
        v = stack.scalar(sel)
        return v if v is not None and math.isclose(v, expected, rel_tol=1e-9, abs_tol=1e-12) else None

    try:
        wait_for(f"{rule} == {expected}", close, timeout=15)
    except AssertionError:
        pytest.fail(f"{rule} = {stack.scalar(sel)}, client-side ratio = {expected} ({dict(stack.measured)})")


def test_rejection_ratio_by_class_equals_client_ratio(stack: Stack) -> None:
    classes = sorted({c for (c, _) in stack.measured})
    expected = {c: _expected_ratio(stack.measured, c) for c in classes}

    def got() -> dict[str, float]:
        res = stack.query(f'dsphere:rejection_ratio_by_class:rate5m{{model="{stack.model}",version="{stack.version}"}}')
        return {r["metric"]["class_name"]: float(r["value"][1]) for r in res}

    def close() -> bool:
        g = got()
        return all(c in g and math.isclose(g[c], e, rel_tol=1e-9, abs_tol=1e-12) for c, e in expected.items())

    try:
        wait_for("per-class rejection ratios", close, timeout=15)
    except AssertionError:
        pytest.fail(f"recorded {got()} != client-side {expected}")


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    empty, nan_only = [], []
    for title, ref, expr in dashboard_queries():
        res = stack.query(expr)
        if not res:
            empty.append(f"{title} [{ref}]: {expr}")
            continue
        values = [float(r["value"][1]) for r in res]
        if not any(math.isfinite(v) for v in values):
            nan_only.append(f"{title} [{ref}]: {expr} -> {values}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert not nan_only, "panels with only NaN:\n" + "\n".join(nan_only)


def test_dashboard_template_variables_resolve(stack: Stack) -> None:
    """label_values(dsphere_model_info, model|version) as Grafana asks it."""
    for var in dashboard()["templating"]["list"]:
        label = var["name"]
        r = stack.client.get(f"{stack.prom}/api/v1/label/{label}/values", params={"match[]": "dsphere_model_info"})
        values = r.json()["data"]
        assert (stack.model if label == "model" else stack.version) in values, (label, values)
