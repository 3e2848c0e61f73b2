"""A REAL uvicorn started on a missing or corrupt model store, then repaired with POST /admin/reload.

For each fault: the process stays up, /healthz is 200, /readyz is 503 with the reason in JSON
(and Retry-After), every inference endpoint answers 503 with a JSON detail, a reload to the
broken version fails (404/409) and leaves it not ready, and a reload to a good version makes it
ready: /classify then answers 200 from that version.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from app.manifest import MANIFEST_FILE, MODEL_FILE
from support.bundled import BUNDLED_STORE, MODEL_NAME
from support.fake_store import build_model, write_version
from support.fashion_mnist import fashion_pngs
from support.server import ServerHandle
from tests.reliability.conftest import ADMIN_TOKEN, BUNDLED_VERSION

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GOOD_VERSION = "1.0.1"  # a good copy of the bundled version, added after the start
INFER = f"/v2/models/{MODEL_NAME}/infer"


def vdir(store: Path, version: str = BUNDLED_VERSION) -> Path:
    return store / MODEL_NAME / version


def _remove_store(store: Path) -> None:
    shutil.rmtree(store)


def _empty_store(store: Path) -> None:
    shutil.rmtree(store / MODEL_NAME)


def _remove_manifest(store: Path) -> None:
    (vdir(store) / MANIFEST_FILE).unlink()


def _manifest_not_json(store: Path) -> None:
    (vdir(store) / MANIFEST_FILE).write_text('{"schema_version": 1, "name": "fashion-mnist-dsphere",')


def _manifest_missing_field(store: Path) -> None:
    path = vdir(store) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    del manifest["angle_mean_deg"]
    path.write_text(json.dumps(manifest))


def _onnx_bytes_flipped(store: Path) -> None:
    path = vdir(store) / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))


def _onnx_truncated(store: Path) -> None:
    path = vdir(store) / MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _onnx_truncated_sha_updated(store: Path) -> None:
    """Truncated model.onnx whose manifest sha256 was updated too: ONNX Runtime itself refuses it."""
    import hashlib

    _onnx_truncated(store)
    path = vdir(store) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["sha256"] = hashlib.sha256((vdir(store) / MODEL_FILE).read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))


def fixed_batch_model() -> bytes:
    """The fixture model with its Flatten replaced by Reshape to [1, 784]: it passes every check
    of the loader (dynamic N declared) but fails at warm-up with a batch of 32 (an export bug)."""
    m = onnx.load_from_string(build_model())
    i = next(k for k, n in enumerate(m.graph.node) if n.op_type == "Flatten")
    flatten = m.graph.node[i]
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 784], np.int64), "fixed_shape"))
    m.graph.node.remove(flatten)
    m.graph.node.insert(i, helper.make_node("Reshape", [flatten.input[0], "fixed_shape"], [flatten.output[0]]))
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _onnx_fails_at_warmup(store: Path) -> None:
    shutil.rmtree(vdir(store))
    write_version(store, BUNDLED_VERSION, model_bytes=fixed_batch_model())


@dataclass(frozen=True)
class Fault:
    id: str
    breaks: Callable[[Path], None]
    reason: str  # in /readyz's detail
    reload_status: int  # POST /admin/reload of the broken version


FAULTS = [
    Fault("store-dir-missing", _remove_store, "does not exist or is not a directory", 404),
    Fault("model-dir-missing", _empty_store, f"model '{MODEL_NAME}' not found in", 404),
    Fault("manifest-missing", _remove_manifest, f"has no version with a {MANIFEST_FILE}", 404),
    Fault("manifest-not-json", _manifest_not_json, f"{MANIFEST_FILE}: not valid JSON", 409),
    Fault("manifest-missing-field", _manifest_missing_field, "invalid manifest: angle_mean_deg: Field required", 409),
    Fault("onnx-sha256-mismatch", _onnx_bytes_flipped, "does not match manifest.json", 409),
    Fault("onnx-truncated", _onnx_truncated, "does not match manifest.json", 409),
    Fault("onnx-truncated-sha-updated", _onnx_truncated_sha_updated, "ONNX Runtime cannot load it", 409),
    Fault("onnx-fails-at-warmup", _onnx_fails_at_warmup, "warm-up inference failed", 409),
]


def add_good_version(store: Path, version: str = GOOD_VERSION) -> None:
    """A copy of the bundled version under another version number (manifest renamed to match)."""
    dst = vdir(store, version)
    dst.mkdir(parents=True)
    shutil.copy(vdir(BUNDLED_STORE) / MODEL_FILE, dst / MODEL_FILE)  # model first, manifest last
    manifest = json.loads((vdir(BUNDLED_STORE) / MANIFEST_FILE).read_text())
    manifest["version"] = version
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest))


def assert_not_ready(srv: ServerHandle, reason: str) -> None:
    png = fashion_pngs(1)[0]
    with srv.client() as c:
        health = c.get("/healthz").json()  # alive, nothing served
        served = {k: health[k] for k in ("status", "model", "runtime")}
        assert served == {"status": "ok", "model": None, "runtime": None}
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        detail = r.json()["detail"]
        assert detail.startswith("model not ready: ") and reason in detail, detail
        for path, req in [
            ("/classify", {"files": {"file": ("a.png", png, "image/png")}}),
            ("/classify", {"content": png, "headers": {"content-type": "image/png"}}),
            ("/classify/batch", {"files": [("files", ("a.png", png, "image/png"))]}),
        ]:
            r = c.post(path, **req)  # type: ignore[arg-type]
            assert r.status_code == 503 and r.json() == {"detail": detail}, (path, r.text)
        r = c.post(INFER, json={"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                            "data": [0.0] * 784}]})
        assert r.status_code == 503 and r.json() == {"error": detail}, r.text
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/metrics").status_code == 200
    assert srv.alive()


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_starts_unready_then_reload_repairs(fault: Fault, store_copy: Path,
                                            server_factory: Callable[..., ServerHandle]) -> None:
    fault.breaks(store_copy)
    srv = server_factory({"DSPHERE_MODEL_STORE": str(store_copy), "DSPHERE_ADMIN_TOKEN": ADMIN_TOKEN},
                         wait_path="/healthz")
    assert_not_ready(srv, fault.reason)
    with srv.client() as c:
        failed = c.post("/admin/reload", json={"version": "latest"}, headers=AUTH)
        assert failed.status_code == fault.reload_status and fault.reason in failed.json()["detail"], failed.text
        assert c.get("/readyz").status_code == 503

        add_good_version(store_copy)
        ok = c.post("/admin/reload", json={"version": GOOD_VERSION}, headers=AUTH)
        assert ok.status_code == 200, ok.text
        assert ok.json()["previous"] is None
        assert ok.json()["model"] == {"name": MODEL_NAME, "version": GOOD_VERSION}
        assert c.get("/readyz").json() == {"status": "ready", "model": {"name": MODEL_NAME, "version": GOOD_VERSION}}
        r = c.post("/classify", files={"file": ("shoe.png", fashion_pngs(1)[0], "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == {"name": MODEL_NAME, "version": GOOD_VERSION}
    log = srv.log_text()
    assert f"cannot load model {MODEL_NAME} (latest)" in log and fault.reason in log
    assert "Traceback" not in log, srv.log_tail()
