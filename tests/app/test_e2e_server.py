"""End to end: a real `uvicorn app.main:app` subprocess on 127.0.0.1, real Fashion-MNIST images.

Uses the bundled model (model_store/fashion-mnist-dsphere, latest version with a
manifest) when present, else the fixture model; the test id says which. Every
verdict must equal geodesic_verdict applied to ONNX Runtime outputs of the same
model.onnx on the same pixels; uniform noise must be rejected (all of it with the
fixture model, a majority with the real one).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fake_store import load_fashion_mnist_test, png_bytes, write_version

from app.manifest import MANIFEST_FILE, MODEL_FILE
from app.model_store import read_manifest, resolve_version
from app.verdict import geodesic_verdict

REPO = Path(__file__).resolve().parents[2]
BUNDLED_STORE = REPO / "model_store"
NAME = "fashion-mnist-dsphere"
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
N_IMAGES = 48
N_NOISE = 24


def _bundled_present() -> bool:
    try:
        resolve_version(BUNDLED_STORE, NAME)
        return True
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server_store(request, tmp_path: Path) -> Path:
    if request.param == "bundled-model":
        return BUNDLED_STORE
    store = tmp_path / "store"
    write_version(store, "1")
    return store


@pytest.mark.parametrize("server_store", ["bundled-model" if _bundled_present() else "fixture-model"], indirect=True)
def test_real_server_verdicts_match_onnxruntime(server_store: Path, tmp_path: Path) -> None:
    assert FMNIST.exists(), f"{FMNIST} is needed for the end-to-end test"
    version = resolve_version(server_store, NAME)
    vdir = server_store / NAME / version
    manifest = read_manifest(vdir / MANIFEST_FILE)
    port = _free_port()
    env = {
        **os.environ,
        "DSPHERE_MODEL_STORE": str(server_store),
        "DSPHERE_MODEL_NAME": NAME,
        "DSPHERE_PROVIDERS": "CPUExecutionProvider",
        "DSPHERE_BATCH_DELAY_MS": "1",
    }
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=base, timeout=10) as c:
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server not ready within 60 s"
                time.sleep(0.1)

            imgs = load_fashion_mnist_test(N_IMAGES)
            noise = np.random.default_rng(0).integers(0, 256, (N_NOISE, 28, 28), dtype=np.uint8)
            pix = np.concatenate([imgs, noise])

            # Reference: ONNX Runtime on the same model.onnx and the same pixels (uint8 / 255).
            sess = ort.InferenceSession(str(vdir / MODEL_FILE), providers=["CPUExecutionProvider"])
            x = pix.astype(np.float32)[:, None] / np.float32(255)
            logits, cosines = sess.run(["logits", "cosines"], {sess.get_inputs()[0].name: x})
            ref = geodesic_verdict(logits, cosines, manifest.angle_mean_deg, manifest.angle_std_deg, manifest.rho)

            got = []
            for i, p in enumerate(pix):
                r = c.post("/classify", files={"file": (f"{i}.png", png_bytes(p), "image/png")})
                assert r.status_code == 200, r.text
                got.append(r.json())
            files = [("files", (f"{i}.png", png_bytes(p), "image/png")) for i, p in enumerate(imgs)]
            batch = c.post("/classify/batch", files=files)
            assert batch.status_code == 200, batch.text
            metrics = c.get("/metrics").text
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
        log.close()
    server_log = (tmp_path / "server.log").read_text()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 (or 0 on older versions)
    assert rc in (0, -15), server_log
    assert "Traceback" not in server_log, server_log

    for i, g in enumerate(got):
        assert g["model"] == {"name": NAME, "version": version}
        assert g["label"] == int(ref.labels[i]), i
        assert g["class_name"] == manifest.class_names[g["label"]]
        assert g["angle_deg"] == pytest.approx(float(ref.angles_deg[i]), abs=1e-3)
        assert g["threshold_deg"] == pytest.approx(float(ref.thresholds_deg[i]), abs=1e-9)
        assert g["verdict"] == ("accept" if ref.accepted[i] else "reject"), i
    assert [b["label"] for b in batch.json()["results"]] == [int(v) for v in ref.labels[:N_IMAGES]]
    assert [b["verdict"] for b in batch.json()["results"]] == [g["verdict"] for g in got[:N_IMAGES]]

    noise_rejected = sum(g["verdict"] == "reject" for g in got[N_IMAGES:])
    if server_store == BUNDLED_STORE:
        assert noise_rejected > N_NOISE // 2, f"only {noise_rejected}/{N_NOISE} noise images rejected"
    else:
        assert noise_rejected == N_NOISE
    assert "dsphere_classifications_total" in metrics
    print(f"\n[e2e] model={NAME}/{version} store={server_store} noise rejected {noise_rejected}/{N_NOISE}")
