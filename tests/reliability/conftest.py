"""Shared fixtures of tests/reliability: real service processes on loopback (support/server.py).

`server`: one `uvicorn app.main:app` on the bundled model store for the whole module; it serves
BUNDLED_VERSION (the store's latest version, support.bundled.bundled_version).
`server_factory`: start_server(...) whose servers are all stopped (and checked) at teardown.
`store_copy`: a temporary store holding a copy of BUNDLED_VERSION alone, free to corrupt.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.bundled import BUNDLED_STORE, MODEL_NAME, bundled_version
from support.server import CLEAN_EXIT, ServerHandle, start_server

BUNDLED_VERSION = bundled_version()
ADMIN_TOKEN = "reliability-admin-token-0123456789"
# These tests send one image in many encodings and the same few images thousands of times: a
# query attack's traffic, to the query-history detector. It runs and counts here ("flag"); the
# verdicts they check are the per-input rule's. The detector's own tests: tests/app/test_query_history.py.
FLAG_ONLY = {"DSPHERE_QUERY_HISTORY_ACTION": "flag"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with start_server({"DSPHERE_ADMIN_TOKEN": ADMIN_TOKEN, **FLAG_ONLY}, log_path=log) as srv:
        yield srv


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerHandle]]:
    started: list[ServerHandle] = []

    def _start(env: dict[str, str] | None = None, workers: int = 1, **kw: Any) -> ServerHandle:
        kw.setdefault("log_path", tmp_path / f"server-{len(started)}.log")
        srv = start_server({**FLAG_ONLY, **(env or {})}, workers, **kw)
        started.append(srv)
        return srv

    yield _start
    for srv in started:
        rc = srv.stop()
        assert rc in CLEAN_EXIT, f"server exited with {rc}\n{srv.log_tail()}"


@pytest.fixture
def store_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(BUNDLED_STORE / MODEL_NAME / BUNDLED_VERSION, dst / MODEL_NAME / BUNDLED_VERSION)
    return dst
