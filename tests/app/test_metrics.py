"""Prometheus metrics: names, labels, route-template endpoint label, promtool check."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from support.fake_store import NAME, prototype
from support.fashion_mnist import png_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _scrape(make_client, **kw) -> str:
    noise = (prototype(0) // 3 + prototype(5) // 3 + 40).astype("uint8")
    async with make_client(**kw) as c:
        await c.post("/classify", content=png_bytes(prototype(2)), headers={"content-type": "image/png"})
        await c.post("/classify", content=png_bytes(noise), headers={"content-type": "image/png"})
        await c.post("/classify", content=b"x", headers={"content-type": "text/plain"})
        await c.get("/models/some-model")
        await c.get("/no/such/path")
        r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


async def test_metric_names_and_labels(make_client) -> None:
    text = await _scrape(make_client)
    assert (
        f'dsphere_classifications_total{{class_name="Pullover",model="{NAME}",verdict="accept",version="1"}} 1.0'
        in text
    )
    assert f'dsphere_angle_degrees_bucket{{le="180.0",model="{NAME}",verdict="accept",version="1"}} 1.0' in text
    assert 'dsphere_requests_total{endpoint="/classify",status="200"} 2.0' in text
    assert 'dsphere_requests_total{endpoint="/classify",status="415"} 1.0' in text
    assert 'dsphere_requests_total{endpoint="/models/{name}",status="404"} 1.0' in text
    assert 'dsphere_requests_total{endpoint="unmatched",status="404"} 1.0' in text
    assert 'dsphere_request_duration_seconds_count{endpoint="/classify"} 3.0' in text
    assert "dsphere_inference_batch_size_count" in text
    assert "dsphere_queue_depth 0.0" in text
    assert f'dsphere_model_info{{model="{NAME}",provider="CPUExecutionProvider",sha256="' in text
    assert "/no/such/path" not in text and "some-model" not in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
async def test_promtool_check_metrics(make_client) -> None:
    text = await _scrape(make_client)
    proc = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


async def test_multiprocess_mode(make_client, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    try:
        text = await _scrape(make_client)
    finally:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        values.ValueClass = values.get_value_class()
    assert 'dsphere_requests_total{endpoint="/classify",status="200"} 2.0' in text
    assert "dsphere_queue_depth" in text
    assert any(p.name.startswith("counter_") for p in tmp_path.iterdir())
