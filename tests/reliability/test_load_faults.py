"""Load, overload, hot reload and SIGTERM against a real uvicorn on 127.0.0.1, bundled model.

Fast versions of the scenarios in support/soak_scenarios.py (each returns what it measured and the
list of requirements the run broke); `make soak` runs them large (bench/soak.py). Bounds and
figures: docs/RELIABILITY.md, sections Load, Overload, Hot reload, SIGTERM.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support.soak_scenarios import run_hot_reload, run_overload, run_sigterm, run_sustained

SUSTAINED_REQUESTS = 3000
RSS_GROWTH_BOUND_MB = 20
QUEUE_SIZE = 8
BURST_CONNECTIONS = 200  # 25x the sustainable concurrency (= the queue size)
ACCEPTED_P99_BOUND_S = 2.0  # 10 ms per connection, as in bench/soak.py (measured about 0.8 s)
RECOVERY_BOUND_S = 1.0
SIGTERM_EXIT_BOUND_S = 10


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_sustained_load_all_2xx_and_memory_flat(tmp_path: Path) -> None:
    r = run_sustained(SUSTAINED_REQUESTS, connections=16, rss_bound_mb=RSS_GROWTH_BOUND_MB,
                      log_path=tmp_path / "server.log")
    assert r.violations() == [], r.figures()
    assert r.run.requests >= SUSTAINED_REQUESTS and r.run.statuses.get(200, 0) >= SUSTAINED_REQUESTS


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_overload_burst_sheds_with_503_retry_after_and_recovers(tmp_path: Path) -> None:
    r = run_overload(BURST_CONNECTIONS, QUEUE_SIZE, burst_s=3, accepted_p99_bound_s=ACCEPTED_P99_BOUND_S,
                     recovery_bound_s=RECOVERY_BOUND_S, log_path=tmp_path / "server.log")
    assert r.violations() == [], r.figures()
    f = r.figures()
    assert f["statuses"].get(503, 0) > 0 and f["statuses"].get(200, 0) > 0


def test_hot_reload_under_load_loses_nothing(tmp_path: Path) -> None:
    r = run_hot_reload(swaps=10, clients=4, log_path=tmp_path / "server.log")
    assert r.violations() == [], (r.figures(), r.log_tail)
    assert len(r.swaps) == 10 and len(r.refusals) == 3


def test_sigterm_under_load_completes_accepted_requests(tmp_path: Path) -> None:
    r = run_sigterm(clients=16, files=64, held=2, exit_bound_s=SIGTERM_EXIT_BOUND_S,
                    log_path=tmp_path / "server.log")
    assert r.violations() == [], (r.figures(), r.log_tail)
