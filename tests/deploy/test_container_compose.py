"""docker-compose.yml + docker-compose.cpu.yml brought up by podman-compose, unchanged.

`api` scaled to 2 replicas and `prometheus` (a local stand-in tagged under the upstream name
where prom/prometheus cannot be pulled: deploy/local-image.sh prometheus). Checks: Prometheus
discovers and scrapes both replicas through the compose network's DNS (monitoring/prometheus.yml
as is), loads every alert and recording rule, and the rejection ratio that the dashboard and the
alerts read rises when a burst of rejected inputs arrives. Grafana's image cannot be had here:
its provisioning is checked statically (test_deploy_compose.py, test_deploy_monitoring.py).

Podman maps no host port RANGE onto one container port (Docker picks a free one), so the test
sets DSPHERE_API_PORTS to the empty string: each replica gets a random loopback port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from .deploy_helpers import (
    API_JOB,
    COMPOSE,
    COMPOSE_CPU,
    FASHION_MNIST_DIR,
    REPO,
    RULE_FILES,
    dashboard_queries,
    fashion_mnist_test,
    free_port,
    png_bytes,
)
from .podman_helpers import PODMAN_ENV, REPORT, BuiltImages, noise_pngs, podman, skip_or_fail, wait_for

httpx = pytest.importorskip("httpx")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                       reason="Fashion-MNIST test set missing (apt-get install -y dataset-fashion-mnist)"),
]  # fmt: skip

REPLICAS = 2
RATIO_RULE = "dsphere:rejection_ratio:rate5m"
# Prometheus as configured: DNS refresh 10 s, scrape 5 s, rule evaluation 15 s.
PROMETHEUS_WAIT_S = 90


def _podman_compose() -> str | None:
    here = Path(sys.executable).parent / "podman-compose"
    return str(here) if here.exists() else shutil.which("podman-compose")


@dataclass
class Project:
    """podman-compose -p NAME -f docker-compose.yml -f docker-compose.cpu.yml, in the repository."""

    exe: str
    name: str
    prometheus_port: int

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**PODMAN_ENV, "DSPHERE_API_PORTS": "", "PROMETHEUS_PORT": str(self.prometheus_port)}
        argv = [self.exe, "-p", self.name, "-f", str(COMPOSE), "-f", str(COMPOSE_CPU), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)

    def containers(self, *filters: str) -> list[str]:
        label = f"label=io.podman.compose.project={self.name}"
        return podman("ps", "-a", "--filter", label, *filters, "--format", "{{.Names}}").stdout.split()


@dataclass
class Stack:
    prom: str
    replicas: dict[str, str]  # container name -> http://127.0.0.1:<port>
    client: Any
    sent: Counter = field(default_factory=Counter)  # verdict -> n, over all replicas

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.client.get(f"{self.prom}/api/v1/query", params={"query": expr}).json()
        assert body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def scalar(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None

    def wait_value(self, what: str, expr: str, ok: Any) -> float:
        """The value of `expr` once ok(value) holds (None while the series is absent)."""
        box: list[float] = []

        def check() -> bool:
            v = self.scalar(expr)
            box[:] = [] if v is None else [v]
            return v is not None and bool(ok(v))

        wait_for(what, check, PROMETHEUS_WAIT_S, 1)
        return box[0]

    def classify_everywhere(self, pngs: list[bytes]) -> Counter:
        """Every image once to every replica; the verdicts as the clients saw them."""
        seen: Counter = Counter()
        for url in self.replicas.values():
            for png in pngs:
                r = self.client.post(f"{url}/classify", files={"file": ("x.png", png, "image/png")})
                assert r.status_code == 200, r.text
                seen[r.json()["verdict"]] += 1
        self.sent += seen
        return seen

    def wait_scraped(self) -> None:
        """Until Prometheus has scraped every classification sent so far, from all replicas."""
        total = sum(self.sent.values())
        self.wait_value(f"Prometheus to scrape {total} classifications", "sum(dsphere_classifications_total)",
                        lambda v: v == total)  # fmt: skip


@pytest.fixture(scope="module")
def stack(local_images: BuiltImages) -> Iterator[Stack]:
    exe = _podman_compose()
    if exe is None:
        skip_or_fail("podman-compose not installed (pip install 'podman-compose>=1.6', part of the dev extra)")
    project = Project(exe, f"dsphere-test-{os.getpid()}", free_port())
    t0 = time.monotonic()
    up = project.run("up", "-d", "--no-build", "--pull", "never", "--scale", f"api={REPLICAS}", "redis", "api",
                     "prometheus")
    client = httpx.Client(timeout=30, trust_env=False)
    try:
        assert up.returncode == 0, f"podman-compose up exited {up.returncode}:\n{up.stdout[-3000:]}{up.stderr[-3000:]}"
        names = project.containers("--filter", "label=io.podman.compose.service=api")
        assert len(names) == REPLICAS, names
        replicas = {n: "http://" + podman("port", n, "8000").stdout.strip() for n in names}
        s = Stack(f"http://127.0.0.1:{project.prometheus_port}", replicas, client)
        for url in replicas.values():
            wait_for(f"{url}/readyz", lambda u=url: client.get(f"{u}/readyz").status_code == 200, 90)
        s.wait_value(f"{REPLICAS} {API_JOB} targets up", f'count(up{{job="{API_JOB}"}} == 1)', lambda v: v == REPLICAS)
        REPORT[f"podman-compose up api x{REPLICAS} + prometheus -> every replica scraped"] = (
            f"{time.monotonic() - t0:.0f} s"
        )
        yield s
    except BaseException:
        logs = project.run("logs", "--tail", "40")
        print(f"--- podman-compose logs\n{logs.stdout[-6000:]}{logs.stderr[-2000:]}")
        raise
    finally:
        client.close()
        down = project.run("down", "-v", "--remove-orphans")
        left = project.containers()
        assert down.returncode == 0 and not left, f"podman-compose down left {left}:\n{down.stderr[-3000:]}"


def test_prometheus_scrapes_every_replica(stack: Stack) -> None:
    targets = stack.client.get(f"{stack.prom}/api/v1/targets").json()["data"]["activeTargets"]
    api = {t["labels"]["instance"]: t["health"] for t in targets if t["labels"]["job"] == API_JOB}
    addresses = set()
    for name in stack.replicas:
        nets = podman("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name)
        addresses |= {f"{ip}:8000" for ip in nets.stdout.split()}
    assert api == dict.fromkeys(addresses, "up"), (api, addresses)
    served = {r["metric"]["instance"] for r in stack.query("dsphere_model_info == 1")}
    assert served == addresses
    for name in stack.replicas:  # the compose healthcheck (the image's command) passes on each
        assert podman("healthcheck", "run", name, check=False).returncode == 0, name


def test_prometheus_loads_every_rule(stack: Stack) -> None:
    want = {r.get("alert") or r.get("record") for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
            for r in g["rules"]}  # fmt: skip

    def loaded() -> dict[str, str]:
        groups = stack.client.get(f"{stack.prom}/api/v1/rules").json()["data"]["groups"]
        return {r["name"]: r["health"] for g in groups for r in g["rules"]}

    wait_for("every rule evaluated once", lambda: set(loaded().values()) == {"ok"}, PROMETHEUS_WAIT_S, 1)
    assert set(loaded()) == want


def test_rejected_burst_moves_the_rejection_ratio(stack: Stack) -> None:
    """Clean Fashion-MNIST traffic, then a burst of noise: the 5-minute rejection ratio (the
    series the dashboard plots and the rejection alerts compare) rises from the clean level
    toward the share of rejections the clients saw."""
    assert any(RATIO_RULE in expr for _, _, expr in dashboard_queries()), f"the dashboard no longer reads {RATIO_RULE}"
    alerts = "\n".join(f.read_text() for f in RULE_FILES if "alert:" in f.read_text())
    assert RATIO_RULE in alerts, f"no alert reads {RATIO_RULE}"
    clean = [png_bytes(img) for img in fashion_mnist_test(24)[0]]
    noise = noise_pngs(24)
    # warm-up: every series the traffic below touches exists before it is measured (rate()
    # sees no increase from a series' absence to its first sample)
    stack.classify_everywhere(clean + noise)
    stack.wait_scraped()
    measured = stack.classify_everywhere(clean)
    stack.wait_scraped()
    clean_ratio = measured["reject"] / sum(measured.values())
    before = stack.wait_value(f"{RATIO_RULE} after the clean traffic", f"sum({RATIO_RULE})",
                              lambda v: abs(v - clean_ratio) < 0.15)  # fmt: skip
    burst = stack.classify_everywhere(noise * 2)
    assert burst["reject"] >= 0.9 * sum(burst.values()), f"noise is not rejected: {burst}"
    measured += burst
    stack.wait_scraped()
    expected = measured["reject"] / sum(measured.values())
    after = stack.wait_value(f"{RATIO_RULE} to rise toward {expected:.2f} (from {before:.3f})", f"sum({RATIO_RULE})",
                             lambda v: v > before + 0.3)  # fmt: skip
    REPORT[f"{RATIO_RULE}, clean then a burst of noise"] = f"{before:.3f} -> {after:.3f} (clients: {expected:.3f})"
    assert abs(after - expected) < 0.1, (after, expected)


def _square_queries(img: np.ndarray, n: int, seed: int) -> list[bytes]:
    """A Square-like attack's queries on one uint8 image: random squares moved by 25 levels."""
    rng = np.random.default_rng(seed)
    adv, out = img.astype(np.int16), []
    for _ in range(n):
        size = int(rng.integers(2, 8))
        r, c = rng.integers(0, 28 - size, 2)
        cand = adv.copy()
        cand[r:r + size, c:c + size] = np.clip(img[r:r + size, c:c + size] + 25 * rng.choice([-1, 1]), 0, 255)
        out.append(png_bytes(cand.astype(np.uint8)))
        adv = cand if rng.random() < 0.5 else adv
    return out


def _first_detection(stack: Stack, pngs: list[bytes], urls: list[str]) -> int:
    """1-based index of the first answer rejected for query_history, the queries sent round-robin."""
    for i, png in enumerate(pngs):
        r = stack.client.post(f"{urls[i % len(urls)]}/classify", files={"file": ("q.png", png, "image/png")})
        assert r.status_code == 200, r.text
        if r.json()["reason"] == "query_history":
            return i + 1
    return len(pngs) + 1


def test_an_attack_spread_over_both_replicas_is_seen_as_one(stack: Stack) -> None:
    """The replicas share one query history in compose's Redis: a query attack sent round-robin
    over them is detected within the queries it takes against one replica (+-20 %)."""
    urls = list(stack.replicas.values())
    for url in urls:
        health = stack.client.get(f"{url}/healthz").json()["query_history"]
        assert health == {"action": "reject", "store": "redis", "status": "ok", "error": None}, health
    images = fashion_mnist_test(30)[0][24:30]
    one = [_first_detection(stack, _square_queries(img, 40, seed), urls[:1]) for seed, img in enumerate(images[:3])]
    spread = [_first_detection(stack, _square_queries(img, 40, seed), urls) for seed, img in enumerate(images[3:])]
    REPORT["query attack: queries to detection, one replica vs round-robin over two"] = f"{one} vs {spread}"
    assert max(one + spread) <= 10
    assert abs(np.median(spread) - np.median(one)) <= max(1.0, 0.2 * np.median(one))
