"""Quarantine of rejected inputs, and settings validation."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.quarantine import Quarantine
from app.settings import SettingsError, load_settings
from support.fake_store import NAME, prototype
from support.fashion_mnist import png_bytes

NOISE = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_rejected_inputs_are_quarantined(make_client, tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    data = png_bytes(NOISE)
    async with make_client(quarantine_dir=qdir) as c:
        ok = await c.post("/classify", content=png_bytes(prototype(1)), headers={"content-type": "image/png"})
        r = await c.post("/classify", content=data, headers={"content-type": "image/png", "x-request-id": "rq1"})
    assert ok.json()["verdict"] == "accept" and r.json()["verdict"] == "reject"
    files = sorted(p.name for p in qdir.iterdir())
    assert len(files) == 2 and files[0].endswith("_rq1.json") and files[1].endswith("_rq1.png")
    assert (qdir / files[1]).read_bytes() == data
    side = json.loads((qdir / files[0]).read_text())
    assert side["request_id"] == "rq1" and side["verdict"] == "reject"
    assert side["model"] == {"name": NAME, "version": "1"}
    assert {"time", "label", "class_name", "angle_deg", "threshold_deg"} <= set(side)


NOISE_ROW = NOISE.astype(np.float32)[None] / 255  # [1, 28, 28], exactly what decoding NOISE's PNG gives


def _request(route: str) -> dict[str, Any]:
    """httpx.post keywords sending one accepted input (prototype 1) and NOISE, in that order when
    the route takes two."""
    ok, noise = png_bytes(prototype(1)), png_bytes(NOISE)
    if route == "/classify/batch":
        return {"files": [("files", ("a.png", ok, "image/png")), ("files", ("b.png", noise, "image/png"))]}
    if route == "/v2/models/{name}/infer":
        x = np.stack([prototype(1).astype(np.float32)[None] / 255, NOISE_ROW])
        return {"json": {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.ravel().tolist()}]}}
    return {"files": {"file": ("n.png", noise, "image/png")}}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("route", "index", "ext"),
    [("/classify", None, ".png"), ("/explain", None, ".png"), ("/classify/batch", 1, ".png"),
     ("/v2/models/{name}/infer", 1, ".npy")],
)
async def test_every_route_that_classifies_quarantines_and_counts_a_rejection(
        make_client, tmp_path: Path, route: str, index: int | None, ext: str) -> None:
    """One place (Service.classify) for every route: the rejected input is kept with its
    classification, and each verdict is counted in dsphere_classifications_total."""
    qdir = tmp_path / "q"
    async with make_client(quarantine_dir=qdir) as c:
        r = await c.post(route.format(name=NAME), headers={"x-request-id": "rq2"}, **_request(route))
        metrics = (await c.get("/metrics")).text
    assert r.status_code == 200, r.text
    stem = "_rq2" if index is None else f"_rq2_{index}"
    files = sorted(p.name for p in qdir.iterdir())
    assert len(files) == 2 and files[0].endswith(f"{stem}.json") and files[1].endswith(f"{stem}{ext}")
    kept = (qdir / files[1]).read_bytes()
    if ext == ".npy":
        assert np.array_equal(np.load(io.BytesIO(kept)), NOISE_ROW)
    else:
        assert kept == png_bytes(NOISE)
    side = json.loads((qdir / files[0]).read_text())
    assert side["request_id"] == "rq2" and side["verdict"] == "reject" and side["index"] == index
    assert side["model"] == {"name": NAME, "version": "1"} and side["image_file"] == files[1]
    rejected = f'dsphere_classifications_total{{class_name="{side["class_name"]}",model="{NAME}",verdict="reject",' \
               'version="1"}'
    accepted = f'dsphere_classifications_total{{class_name="Trouser",model="{NAME}",verdict="accept",version="1"}}'
    assert f"{rejected} 1.0" in metrics
    assert (f"{accepted} 1.0" in metrics) == (index is not None)  # the batch's and v2's accepted row
    assert f'dsphere_angle_degrees_count{{model="{NAME}",verdict="reject",version="1"}} 1.0' in metrics


def test_quarantine_evicts_oldest(tmp_path: Path) -> None:
    q = Quarantine(tmp_path, max_bytes=3000)
    paths = [q.add(b"x" * 800, ".png", {"request_id": f"r{i}"}) for i in range(5)]
    assert all(p is not None for p in paths)
    left = {p.name for p in tmp_path.iterdir()}
    assert q.total_bytes <= 3000
    assert paths[0].name not in left and paths[4].name in left  # type: ignore[union-attr]
    assert q.add(b"y" * 5000, ".png", {"request_id": "huge"}) is None  # larger than the budget: dropped
    q2 = Quarantine(tmp_path, max_bytes=3000)  # restart: existing entries counted
    assert q2.total_bytes == q.total_bytes


def test_settings_defaults_and_env(monkeypatch) -> None:
    monkeypatch.setenv("DSPHERE_BATCH_SIZE", "8")
    monkeypatch.setenv("DSPHERE_PROVIDERS", "CPUExecutionProvider")
    s = load_settings()
    assert s.batch_size == 8 and s.provider_list == ["CPUExecutionProvider"]
    assert s.model_name == "fashion-mnist-baseline" and s.model_version == "latest"
    assert s.max_upload_bytes == 10 * 1024 * 1024 and s.admin_token is None


@pytest.mark.parametrize(
    "env,message",
    [
        (
            {"DSPHERE_BATCH_SIZE": "0"},
            "invalid settings: DSPHERE_BATCH_SIZE='0': Input should be greater than or equal to 1",
        ),
        (
            {"DSPHERE_PROVIDERS": "GPUThing"},
            "invalid settings: DSPHERE_PROVIDERS='GPUThing': Value error, unknown provider(s)",
        ),
        ({"DSPHERE_ADMIN_TOKEN": "short"}, "invalid settings: DSPHERE_ADMIN_TOKEN: Value error, must be at least 16"),
        ({"DSPHERE_RHO": "-1"}, "invalid settings: DSPHERE_RHO='-1': Input should be greater than 0"),
    ],
)
def test_invalid_settings_one_line(monkeypatch, env, message) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as ei:
        load_settings()
    assert str(ei.value).startswith(message)
    assert "\n" not in str(ei.value) and "short" not in str(ei.value)[len("invalid settings"):].replace("DSPHERE", "")


def test_invalid_settings_fail_at_start() -> None:
    env = {"DSPHERE_PORT": "99999", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", "import app.main"], env=env, capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "invalid settings: DSPHERE_PORT='99999': Input should be less than or equal to 65535"
    )
