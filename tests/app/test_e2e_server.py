"""End to end: a real `uvicorn app.main:app` subprocess on 127.0.0.1, real Fashion-MNIST images.

Serves each bundled model by name (the default, model_store/fashion-mnist-baseline, and the
D-SphereNet model_store/fashion-mnist-dsphere through DSPHERE_MODEL_NAME; latest version with a
manifest) when present, else the fixture model; the test id says which. Every
verdict must equal geodesic_verdict applied to ONNX Runtime outputs of the same
model.onnx on the same pixels; uniform noise must be rejected (all of it with the
fixture model, a majority with the real one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.manifest import MANIFEST_FILE, MODEL_FILE
from app.model_store import find_version, read_manifest
from app.verdict import geodesic_verdict
from support.bundled import BUNDLED_STORE
from support.bundled import MODEL_NAME as DEFAULT_NAME
from support.fake_store import write_version
from support.fashion_mnist import TEST_IMAGES as FMNIST
from support.fashion_mnist import load_fashion_mnist_test, png_bytes
from support.server import start_server

N_IMAGES = 48
N_NOISE = 24
OTHER_NAME = next(n for n in ("fashion-mnist-dsphere", "fashion-mnist-baseline") if n != DEFAULT_NAME)


def _bundled_present(name: str) -> bool:
    try:
        find_version(BUNDLED_STORE, name)
        return True
    except Exception:
        return False


SERVED = [("bundled-model", DEFAULT_NAME) if _bundled_present(DEFAULT_NAME) else ("fixture-model", DEFAULT_NAME)]
SERVED += [("bundled-model", OTHER_NAME)] if _bundled_present(OTHER_NAME) else []


@pytest.fixture
def server_store(request, tmp_path: Path) -> Path:
    if request.param == "bundled-model":
        return BUNDLED_STORE
    store = tmp_path / "store"
    write_version(store, "1")
    return store


@pytest.mark.parametrize(("server_store", "name"), SERVED, indirect=["server_store"])
def test_real_server_verdicts_match_onnxruntime(server_store: Path, name: str, tmp_path: Path) -> None:
    assert FMNIST.exists(), f"{FMNIST} is needed for the end-to-end test"
    version = find_version(server_store, name)
    vdir = server_store / name / version
    manifest = read_manifest(vdir / MANIFEST_FILE)
    log = tmp_path / "server.log"
    env = {"DSPHERE_MODEL_STORE": str(server_store)} | ({} if name == DEFAULT_NAME else {"DSPHERE_MODEL_NAME": name})
    with start_server(env, log_path=log) as srv:
        with srv.client(timeout=10) as c:
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
            detail = c.get(f"/models/{name}").json()
    server_log = srv.log_text()  # start_server's context checked the clean exit on SIGTERM
    assert "Traceback" not in server_log, server_log

    for i, g in enumerate(got):
        assert g["model"] == {"name": name, "version": version}
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
    assert detail["served_version"] == version and detail["manifest"]["rho"] == pytest.approx(manifest.rho)
    assert detail["manifest"]["metrics"] == manifest.metrics.model_dump(mode="json")
    print(f"\n[e2e] model={name}/{version} store={server_store} noise rejected {noise_rejected}/{N_NOISE}")
