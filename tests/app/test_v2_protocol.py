"""The Open Inference Protocol in process (the fixture model): server metadata, the versioned routes,
the binary tensor data extension both ways, the settings of the gRPC server, and the generated gRPC
code kept in step with the vendored .proto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.settings import SettingsError, load_settings
from app.v2_binary import HEADER_LENGTH
from support.fake_store import NAME, prototype

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _x() -> np.ndarray:
    protos = np.stack([prototype(k) for k in (2, 8)]).astype(np.float32)[:, None] / 255
    noise = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    return np.concatenate([protos, noise])


def _split(body: bytes, header_length: str) -> tuple[dict, bytes]:
    n = int(header_length)
    return json.loads(body[:n]), body[n:]


async def test_server_metadata_and_versioned_routes(make_client) -> None:
    async with make_client() as c:
        server = (await c.get("/v2")).json()
        meta = await c.get(f"/v2/models/{NAME}/versions/1")
        ready = await c.get(f"/v2/models/{NAME}/versions/1/ready")
        other_meta = await c.get(f"/v2/models/{NAME}/versions/2")
        other_ready = await c.get(f"/v2/models/{NAME}/versions/2/ready")
        x = _x()
        body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        infer = await c.post(f"/v2/models/{NAME}/versions/1/infer", json=body)
        other_infer = await c.post(f"/v2/models/{NAME}/versions/2/infer", json=body)
        metrics = (await c.get("/metrics")).text
    assert server == {"name": "dsphere", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    assert meta.status_code == 200 and meta.json()["versions"] == ["1"]
    assert ready.json() == {"name": NAME, "ready": True}
    error = {"error": f"model '{NAME}' version '2' is not loaded; the version served is '1'"}
    for r in (other_meta, other_ready, other_infer):
        assert r.status_code == 404 and r.json() == error
    assert infer.status_code == 200 and infer.headers["content-type"] == "application/json"
    assert infer.json()["model_version"] == "1"
    assert 'dsphere_requests_total{endpoint="/v2/models/{name}/versions/{version}/infer",status="200"} 1.0' in metrics


async def test_binary_request_and_response(make_client) -> None:
    x = _x()
    head = {"id": "bin-1", "parameters": {"binary_data_output": True, "priority": 3, "custom": "kept"},
            "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "label"}, {"name": "reason"},
                        {"name": "accepted", "parameters": {"binary_data": False}}, {"name": "threshold_deg"}]}
    text = json.dumps(head).encode()
    async with make_client() as c:
        r = await c.post(f"/v2/models/{NAME}/infer", content=text + x.astype("<f4").tobytes(),
                         headers={HEADER_LENGTH: str(len(text)), "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    meta, blob = _split(r.content, r.headers[HEADER_LENGTH])
    assert meta["id"] == "bin-1" and meta["model_name"] == NAME
    outs = meta["outputs"]
    assert [o["name"] for o in outs] == ["label", "reason", "accepted", "threshold_deg"]
    assert outs[2] == {"name": "accepted", "datatype": "BOOL", "shape": [3], "data": [True, True, False]}
    sizes = [o.get("parameters", {}).get("binary_data_size", 0) for o in outs]
    assert sizes == [24, 3 * 4 + len("angle"), 0, 24] and len(blob) == sum(sizes)
    labels = np.frombuffer(blob[:24], "<i8")
    assert labels[:2].tolist() == [2, 8]
    reason = blob[24:24 + sizes[1]]
    assert reason == b"\0\0\0\0" + b"\0\0\0\0" + b"\5\0\0\0angle"
    assert np.frombuffer(blob[24 + sizes[1]:], "<f8").tolist() == [15.0, 15.0, 15.0]


async def test_gzip_body_and_limits(make_client) -> None:
    import gzip

    x = np.zeros((1, 1, 28, 28), np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    bomb = gzip.compress(b" " * 200_000)
    async with make_client(max_batch_upload_bytes=100_000, max_upload_bytes=10_000) as c:
        ok = await c.post(f"/v2/models/{NAME}/infer", content=gzip.compress(body),
                          headers={"content-encoding": "gzip", "content-type": "application/json"})
        big = await c.post(f"/v2/models/{NAME}/infer", content=bomb, headers={"content-encoding": "gzip"})
        br = await c.post(f"/v2/models/{NAME}/infer", content=body, headers={"content-encoding": "br"})
    assert ok.status_code == 200, ok.text
    assert big.status_code == 413 and big.json() == {"error": "request body exceeds the limit of 100000 bytes"}
    assert br.status_code == 415


def test_grpc_port_setting() -> None:
    assert load_settings().grpc_port is None
    assert load_settings(grpc_port="").grpc_port is None
    assert load_settings(grpc_port="8001").grpc_port == 8001
    with pytest.raises(SettingsError, match="DSPHERE_GRPC_PORT"):
        load_settings(grpc_port="70000")


def test_generated_grpc_code_matches_the_vendored_proto(tmp_path: Path) -> None:
    """The committed modules were generated from the .proto beside them (by the descriptor they hold),
    in a descriptor pool of their own, and the servicer implements every RPC of the service."""
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2

    from app.grpc_generated import generate
    from app.grpc_generated import grpc_predict_v2_pb2 as pb
    from app.grpc_server import Servicer

    generate.generate(tmp_path)
    fresh = (tmp_path / "app" / "grpc_generated" / "grpc_predict_v2_pb2.py").read_text()
    committed = (REPO / "app" / "grpc_generated" / "grpc_predict_v2_pb2.py").read_text()
    start = "AddSerializedFile("
    assert fresh[fresh.index(start):].split("\n", 1)[0] == committed[committed.index(start):].split("\n", 1)[0]
    assert generate.OWN_POOL in committed and generate.DEFAULT_POOL not in committed
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    (service,) = proto.service
    assert proto.package == "inference" and service.name == "GRPCInferenceService"
    methods = [m.name for m in service.method]
    assert methods == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
    assert all(m in vars(Servicer) for m in methods)
