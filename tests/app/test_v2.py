"""Open Inference Protocol v2 endpoints."""

from __future__ import annotations

import numpy as np
import pytest

from support.fake_store import NAME, prototype

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _payload(x: np.ndarray, **extra) -> dict:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return {"inputs": [tensor], **extra}


async def test_health_and_metadata(make_client) -> None:
    async with make_client() as c:
        assert (await c.get("/v2/health/live")).json() == {"live": True}
        assert (await c.get("/v2/health/ready")).json() == {"ready": True}
        assert (await c.get(f"/v2/models/{NAME}/ready")).json() == {"name": NAME, "ready": True}
        meta = (await c.get(f"/v2/models/{NAME}")).json()
        missing = await c.get("/v2/models/other")
    assert meta == {
        "name": NAME,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "angle_deg", "datatype": "FP64", "shape": [-1]},
            {"name": "accepted", "datatype": "BOOL", "shape": [-1]},
            {"name": "reason", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    assert missing.status_code == 404 and missing.json() == {"error": "model 'other' not found"}


async def test_infer(make_client) -> None:
    protos = np.stack([prototype(k) for k in (2, 8)]).astype(np.float32)[:, None] / 255
    noise = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    x = np.concatenate([protos, noise])
    async with make_client() as c:
        r = await c.post(f"/v2/models/{NAME}/infer", json=_payload(x, id="req-7"))
        nested = await c.post(
            f"/v2/models/{NAME}/infer",
            json={"inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": protos.tolist()}],
                  "outputs": [{"name": "probability"}, {"name": "threshold_deg"}]},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == NAME and body["model_version"] == "1" and body["id"] == "req-7"
    out = {o["name"]: o for o in body["outputs"]}
    assert list(out) == ["label", "angle_deg", "accepted", "reason"]
    assert out["reason"]["datatype"] == "BYTES" and out["reason"]["data"] == ["", "", "angle"]
    assert out["label"] == {"name": "label", "datatype": "INT64", "shape": [3], "data": [2, 8, out["label"]["data"][2]]}
    assert out["accepted"]["data"] == [True, True, False] and out["accepted"]["datatype"] == "BOOL"
    assert out["angle_deg"]["datatype"] == "FP64" and out["angle_deg"]["data"][2] > 15
    assert nested.status_code == 200, nested.text
    n_out = {o["name"]: o["data"] for o in nested.json()["outputs"]}
    assert n_out["threshold_deg"] == [15.0, 15.0] and all(p > 0.5 for p in n_out["probability"])


@pytest.mark.parametrize(
    "payload,detail",
    [
        ({"inputs": []}, "expected exactly one input tensor, got 0"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "INT8", "data": [0] * 784}]},
         "input 'input': datatype must be FP32, got INT8"),
        ({"inputs": [{"name": "input", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": [0] * 2352}]},
         "input 'input': shape must be [N, 1, 28, 28] with N >= 1, got [1, 3, 28, 28]"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0] * 10}]},
         "input 'input': data has 10 values, shape [1, 1, 28, 28] needs 784"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [2.0] * 784}]},
         "input 'input': values must be finite and within [0, 1]"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ["a"] * 784}]},
         "input 'input': data must be numbers (flat or nested)"),
        ({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0] * 784}],
          "outputs": [{"name": "logits"}]},
         "unknown output(s) ['logits']; available: "
         "['accepted', 'angle_deg', 'label', 'probability', 'reason', 'threshold_deg']"),
        ({"inputz": []}, "invalid inference request: inputs: Field required"),
        ([], "invalid inference request: (root): Input should be a valid dictionary or instance of V2InferRequest"),
    ],
)
async def test_infer_errors(make_client, payload, detail) -> None:
    async with make_client() as c:
        r = await c.post(f"/v2/models/{NAME}/infer", json=payload)
    assert r.status_code == 400
    assert r.json() == {"error": detail}


async def test_infer_not_json_and_too_many(make_client) -> None:
    async with make_client(max_batch_files=2) as c:
        r = await c.post(f"/v2/models/{NAME}/infer", content=b"{nope", headers={"content-type": "application/json"})
        x = np.zeros((3, 1, 28, 28), np.float32)
        r2 = await c.post(f"/v2/models/{NAME}/infer", json=_payload(x))
        r3 = await c.post("/v2/models/other/infer", json=_payload(x))
    assert r.status_code == 400 and r.json() == {"error": "invalid inference request: body is not valid JSON"}
    assert r2.status_code == 413 and r2.json() == {"error": "input 'input': batch of 3 exceeds the limit of 2"}
    assert r3.status_code == 404 and r3.json() == {"error": "model 'other' not found"}


async def test_not_ready(make_client, tmp_path) -> None:
    async with make_client(model_store=tmp_path / "none") as c:
        r = await c.get("/v2/health/ready")
        r2 = await c.get(f"/v2/models/{NAME}/ready")
    assert r.status_code == 503 and r.json() == {"ready": False}
    assert r2.status_code == 503 and r2.json()["error"].startswith("model not ready: ")
