"""Quarantine of rejected inputs, and settings validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.quarantine import Quarantine
from app.settings import SettingsError, load_settings
from support.fake_store import prototype
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
    assert side["model"] == {"name": "fashion-mnist-dsphere", "version": "1"}
    assert {"time", "label", "class_name", "angle_deg", "threshold_deg"} <= set(side)


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
    assert s.model_name == "fashion-mnist-dsphere" and s.model_version == "latest"
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
