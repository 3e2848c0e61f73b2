"""POST /admin/reload: auth, atomic swap, failed load keeps the old model."""

from __future__ import annotations

import asyncio

import pytest

from support.fake_store import NAME, prototype, write_version
from support.fashion_mnist import png_bytes
from tests.app.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.anyio
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _classify(c):
    return await c.post("/classify", content=png_bytes(prototype(0)), headers={"content-type": "image/png"})


async def test_disabled_without_token(make_client) -> None:
    async with make_client() as c:
        r = await c.post("/admin/reload", json={"version": "1"}, headers=AUTH)
    assert r.status_code == 503
    assert r.json() == {"detail": "admin endpoint disabled: set DSPHERE_ADMIN_TOKEN to enable it"}


async def test_auth(make_client) -> None:
    async with make_client(admin_token=ADMIN_TOKEN) as c:
        r = await c.post("/admin/reload", json={"version": "1"})
        r2 = await c.post("/admin/reload", json={"version": "1"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json() == {"detail": "missing bearer token"}
    assert r.headers["www-authenticate"] == "Bearer"
    assert r2.status_code == 401 and r2.json() == {"detail": "invalid bearer token"}


async def test_reload_swaps_and_names_version(make_client, store) -> None:
    async with make_client(admin_token=ADMIN_TOKEN, model_version="1") as c:
        write_version(store, "2", seed=0)
        assert (await _classify(c)).json()["model"]["version"] == "1"
        r = await c.post("/admin/reload", json={"version": "2"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "reloaded"
        assert r.json()["previous"] == {"name": NAME, "version": "1"}
        assert r.json()["model"] == {"name": NAME, "version": "2"}
        assert (await _classify(c)).json()["model"]["version"] == "2"
        assert (await c.get("/readyz")).json()["model"]["version"] == "2"
        metrics = (await c.get("/metrics")).text
    info = [line for line in metrics.splitlines() if line.startswith("dsphere_model_info{")]
    assert len(info) == 1 and 'version="2"' in info[0] and info[0].endswith(" 1.0")


async def test_failed_reload_keeps_old_model(make_client, store) -> None:
    d = write_version(store, "2")
    (d / "model.onnx").write_bytes(b"tampered")
    async with make_client(admin_token=ADMIN_TOKEN, model_version="1") as c:
        r = await c.post("/admin/reload", json={"version": "2"}, headers=AUTH)
        r2 = await c.post("/admin/reload", json={"version": "9"}, headers=AUTH)
        r3 = await c.post("/admin/reload", json={"version": "../etc"}, headers=AUTH)
        after = await _classify(c)
    assert r.status_code == 409
    assert r.json()["detail"].startswith(f"{d / 'model.onnx'}: sha256 ")
    assert r2.status_code == 404
    where = store / NAME
    assert r2.json() == {"detail": f"version '9' of model '{NAME}' not found in {where}"}
    assert r3.status_code == 422 and r3.json()["detail"].startswith("body.version: String should match pattern")
    assert after.status_code == 200 and after.json()["model"]["version"] == "1"


async def test_in_flight_requests_finish_on_old_model(make_client, store) -> None:
    """Requests queued on the old runtime complete (on the old version) across a swap."""
    write_version(store, "2")
    async with make_client(admin_token=ADMIN_TOKEN, model_version="1", batch_delay_ms=1000, batch_size=64) as c:
        svc = c.app.state.service  # type: ignore[attr-defined]
        old = svc.runtime
        hold = old.ticket()  # an announced request keeps the old worker waiting to fill its batch
        inflight = [asyncio.ensure_future(_classify(c)) for _ in range(5)]
        while old.batcher.depth < 5:  # all five queued in the old batcher
            await asyncio.sleep(0.001)
        r = await c.post("/admin/reload", json={"version": "2"}, headers=AUTH)
        assert r.status_code == 200  # closing the old batcher runs what it holds
        hold.close()
        results = [(await f).json() for f in inflight]
        new = (await _classify(c)).json()
    assert [x["model"]["version"] for x in results] == ["1"] * 5
    assert new["model"]["version"] == "2"
