"""Shared fixtures of tests/reliability: real service processes on loopback (tests/server_process.py).

`server`: one `uvicorn app.main:app` on the bundled model store for the whole module.
`server_factory`: start_server(...) whose servers are all stopped (and checked) at teardown.
`store_copy`: a temporary copy of the bundled store, free to corrupt.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app.fake_store import load_fashion_mnist_test, png_bytes
from tests.server_process import (
    BUNDLED_STORE,
    CLEAN_EXIT,
    MODEL_NAME,
    ServerHandle,
    free_port,
    rss_of,
    start_server,
)

__all__ = [
    "BUNDLED_STORE", "CLEAN_EXIT", "MODEL_NAME", "ServerHandle", "free_port", "rss_of", "start_server",
    "fashion_pngs", "load_fashion_mnist_test", "png_bytes",
]

BUNDLED_VERSION = "1.0.0"
ADMIN_TOKEN = "reliability-admin-token-0123456789"


def fashion_pngs(n: int) -> list[bytes]:
    """The first n Fashion-MNIST test images as PNG bytes."""
    return [png_bytes(img) for img in load_fashion_mnist_test(n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with start_server({"DSPHERE_ADMIN_TOKEN": ADMIN_TOKEN}, log_path=log) as srv:
        yield srv


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerHandle]]:
    started: list[ServerHandle] = []

    def _start(env: dict[str, str] | None = None, workers: int = 1, **kw: Any) -> ServerHandle:
        kw.setdefault("log_path", tmp_path / f"server-{len(started)}.log")
        srv = start_server(env, workers, **kw)
        started.append(srv)
        return srv

    yield _start
    for srv in started:
        rc = srv.stop()
        assert rc in CLEAN_EXIT, f"server exited with {rc}\n{srv.log_tail()}"


@pytest.fixture
def store_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(BUNDLED_STORE / MODEL_NAME, dst / MODEL_NAME)
    return dst
