"""The Open Inference Protocol with the real clients against a real server (`uvicorn app.main:app`
with DSPHERE_GRPC_PORT set, the bundled model): Triton's HTTP client (binary and JSON tensors) and
gRPC client, every call of the protocol; KServe's REST client (in a process of its own: the kserve
and tritonclient.grpc packages cannot be imported into one process, both register the protocol's
messages in protobuf's default pool). A batch of Fashion-MNIST images gets the same labels, angles
and verdicts over every transport as from /classify; malformed bodies each get the protocol's
error, the server keeps serving, nothing is a 5xx or a traceback.

The result cache is off (DSPHERE_QUERY_HISTORY_RESULT_CACHE=0): every transport runs the model.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from support.bundled import BUNDLED_STORE, MODEL_NAME, REPO, bundled_version  # noqa: E402
from support.fashion_mnist import TEST_IMAGES, load_fashion_mnist_test, png_bytes  # noqa: E402
from support.server import ServerHandle, free_port, start_server  # noqa: E402

N = 16
pytestmark = pytest.mark.skipif(not TEST_IMAGES.exists(), reason=f"{TEST_IMAGES} is needed")


class Served:
    def __init__(self, srv: ServerHandle, grpc_url: str, version: str) -> None:
        self.srv, self.grpc_url, self.version = srv, grpc_url, version
        self.http_url = srv.url.removeprefix("http://")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = free_port()
    env = {"DSPHERE_MODEL_STORE": str(BUNDLED_STORE), "DSPHERE_GRPC_PORT": str(port),
           "DSPHERE_QUERY_HISTORY_RESULT_CACHE": "0", "DSPHERE_MAX_BATCH_FILES": "64"}
    log = tmp_path_factory.mktemp("v2-clients") / "server.log"
    with start_server(env, log_path=log) as srv:
        yield Served(srv, f"127.0.0.1:{port}", bundled_version())
    text = srv.log_text()
    assert "Traceback" not in text, text[-4000:]
    assert "gRPC server stopped" in text


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_fashion_mnist_test(N)


@pytest.fixture(scope="module")
def reference(served: Served, images: np.ndarray) -> list[dict]:
    """/classify's answer on each image (PNG upload)."""
    with served.srv.client(timeout=30) as c:
        out = []
        for i, img in enumerate(images):
            r = c.post("/classify", files={"file": (f"{i}.png", png_bytes(img), "image/png")})
            assert r.status_code == 200, r.text
            out.append(r.json())
    return out


def _x(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32)[:, None] / np.float32(255)


def _check_same(reference: list[dict], labels, angles, accepted, reasons) -> None:
    assert [int(v) for v in labels] == [r["label"] for r in reference]
    assert [bool(v) for v in accepted] == [r["verdict"] == "accept" for r in reference]
    assert [v.decode() if isinstance(v, bytes) else v for v in reasons] == [r["reason"] or "" for r in reference]
    np.testing.assert_allclose(np.asarray(angles, np.float64), [r["angle_deg"] for r in reference], atol=1e-3)


def test_triton_http_client_every_call(served: Served) -> None:
    c = tritonclient_http.InferenceServerClient(served.http_url)
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "dsphere" and "binary_tensor_data" in meta["extensions"]
    assert c.is_model_ready(MODEL_NAME) and c.is_model_ready(MODEL_NAME, served.version)
    assert not c.is_model_ready(MODEL_NAME, "0.0.1") and not c.is_model_ready("no-such-model")
    for version in ("", served.version):
        m = c.get_model_metadata(MODEL_NAME, version)
        assert m["versions"] == [served.version] and m["inputs"][0]["shape"] == [-1, 1, 28, 28]
        assert [o["name"] for o in m["outputs"]] == ["label", "angle_deg", "accepted", "reason"]
    with pytest.raises(InferenceServerException, match="version '0.0.1' is not loaded") as e:
        c.get_model_metadata(MODEL_NAME, "0.0.1")
    assert e.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_http_infer_same_as_classify(served: Served, images, reference, binary: bool) -> None:
    c = tritonclient_http.InferenceServerClient(served.http_url)
    x = _x(images)
    inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    names = ["label", "angle_deg", "accepted", "reason", "probability"]
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in names]
    for version in ("", served.version):
        r = c.infer(MODEL_NAME, [inp], model_version=version, outputs=outputs, request_id=f"rid-{binary}")
        assert r.get_response()["id"] == f"rid-{binary}"
        assert r.get_response()["model_version"] == served.version
        _check_same(reference, *(r.as_numpy(n) for n in names[:4]))
        np.testing.assert_allclose(r.as_numpy("probability"), [ref["probability"] for ref in reference], atol=1e-4)
    default = c.infer(MODEL_NAME, [inp])  # no outputs asked: the client asks every output as binary
    assert [o["name"] for o in default.get_response()["outputs"]] == names[:4]
    assert all("binary_data_size" in o["parameters"] for o in default.get_response()["outputs"])
    _check_same(reference, *(default.as_numpy(n) for n in names[:4]))
    with pytest.raises(InferenceServerException, match="is not loaded") as e:
        c.infer(MODEL_NAME, [inp], model_version="0.0.1")
    assert e.value.status() == "404"


def test_triton_grpc_client_every_call(served: Served, images, reference) -> None:
    c = tritonclient_grpc.InferenceServerClient(served.grpc_url)
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata(as_json=True)
    assert meta["name"] == "dsphere" and meta["extensions"] == ["binary_tensor_data"]
    assert c.is_model_ready(MODEL_NAME) and c.is_model_ready(MODEL_NAME, served.version)
    assert not c.is_model_ready(MODEL_NAME, "0.0.1") and not c.is_model_ready("no-such-model")
    for version in ("", served.version):
        m = c.get_model_metadata(MODEL_NAME, version, as_json=True)
        assert m["versions"] == [served.version] and m["platform"] == "onnxruntime_onnx"
    with pytest.raises(InferenceServerException, match="not loaded") as e:
        c.get_model_metadata(MODEL_NAME, "0.0.1")
    assert e.value.status() == "StatusCode.NOT_FOUND"

    x = _x(images)
    inp = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    names = ["label", "angle_deg", "accepted", "reason"]
    for version in ("", served.version):
        r = c.infer(MODEL_NAME, [inp], model_version=version, request_id="grpc-7",
                    outputs=[tritonclient_grpc.InferRequestedOutput(n) for n in names])
        assert r.get_response().id == "grpc-7" and r.get_response().model_version == served.version
        _check_same(reference, *(r.as_numpy(n) for n in names))
    with pytest.raises(InferenceServerException, match="not loaded") as e:
        c.infer(MODEL_NAME, [inp], model_version="0.0.1")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_contents_form_and_request_id(served: Served, images, reference) -> None:
    """Inputs in contents.fp32_contents get outputs in contents; x-request-id comes back."""
    from app.grpc_generated import grpc_predict_v2_pb2 as pb
    from app.grpc_generated import grpc_predict_v2_pb2_grpc as pb_grpc

    x = _x(images)
    with grpc.insecure_channel(served.grpc_url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name=MODEL_NAME)
        t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        t.contents.fp32_contents.extend(x.ravel().tolist())
        resp, call = stub.ModelInfer.with_call(req, metadata=(("x-request-id", "my-id-1"),))
    assert resp.id == "my-id-1" and ("x-request-id", "my-id-1") in call.trailing_metadata()
    assert not resp.raw_output_contents
    out = {o.name: o.contents for o in resp.outputs}
    _check_same(reference, out["label"].int64_contents, out["angle_deg"].fp64_contents,
                out["accepted"].bool_contents, out["reason"].bytes_contents)


KSERVE_SCRIPT = textwrap.dedent("""
    import asyncio, io, json, sys
    import numpy as np
    from kserve import InferenceRESTClient, RESTConfig, InferRequest, InferInput

    url, name, version, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    x = np.load(io.BytesIO(sys.stdin.buffer.read()))

    async def main():
        out = {}
        c = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        out["live"] = await c.is_server_live(url)
        out["ready"] = await c.is_server_ready(url)
        out["model_ready"] = await c.is_model_ready(url, name)
        for binary in (False, True):
            inp = InferInput(name="input", shape=list(x.shape), datatype="FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            res = await c.infer(url, InferRequest(model_name=name, infer_inputs=[inp], request_id="ks-1"), name)
            got = {o.name: o.as_numpy().tolist() for o in res.outputs}
            got["reason"] = [r.decode() if isinstance(r, bytes) else r for r in got["reason"]]
            out["binary" if binary else "json"] = {"id": res.id, **got}
        await c.close()
        print(json.dumps(out))

    asyncio.run(main())
""")


def test_kserve_rest_client(served: Served, images, reference, tmp_path: Path) -> None:
    import importlib.util
    import io

    if importlib.util.find_spec("kserve") is None:  # found, not imported: it cannot share this process
        pytest.skip("kserve is not installed")

    buf = io.BytesIO()
    np.save(buf, _x(images))
    proc = subprocess.run([sys.executable, "-c", KSERVE_SCRIPT, served.srv.url, MODEL_NAME, served.version, str(N)],
                          input=buf.getvalue(), capture_output=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["model_ready"]
    for form in ("json", "binary"):
        got = out[form]
        assert got["id"] == "ks-1"  # (its InferResponse does not read model_version)
        _check_same(reference, got["label"], got["angle_deg"], got["accepted"], got["reason"])


def _binary_body(header: dict, blob: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def _tensor(shape, datatype="FP32", size=None, **extra) -> dict:
    t = {"name": "input", "shape": shape, "datatype": datatype, **extra}
    if size is not None:
        t["parameters"] = {"binary_data_size": size}
    return t


def test_malformed_bodies_get_the_protocols_error_and_nothing_is_lost(served: Served, images) -> None:
    x = _x(images[:2])
    blob = x.tobytes()
    path = f"/v2/models/{MODEL_NAME}/infer"
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = []

    def case(what: str, header: dict, data: bytes, status: int, error: str, **headers: str) -> None:
        body, h = _binary_body(header, data)
        cases.append((what, body, {**h, **headers}, status, error))

    ok = {"inputs": [_tensor([2, 1, 28, 28], size=len(blob))]}
    case("header length beyond the body", ok, blob, 400, "Inference-Header-Content-Length is 99999999",
         **{"Inference-Header-Content-Length": "99999999"})
    case("header length not a number", ok, blob, 400, "must be a number of bytes",
         **{"Inference-Header-Content-Length": "12a"})
    case("header length too short", ok, blob, 400, "invalid inference request: body is not valid JSON",
         **{"Inference-Header-Content-Length": "10"})
    case("binary_data_size beyond the body", {"inputs": [_tensor([2, 1, 28, 28], size=len(blob) + 4)]}, blob, 400,
         f"binary_data_size is {len(blob) + 4}, {len(blob)} bytes of binary data are left")
    case("bytes left over", {"inputs": [_tensor([2, 1, 28, 28], size=len(blob) - 8)]}, blob, 400,
         "8 bytes of binary data after the inputs")
    case("wrong datatype", {"inputs": [_tensor([2, 1, 28, 28], "INT8", size=len(blob))]}, blob, 400,
         "datatype must be FP32, got INT8")
    case("unknown datatype", {"inputs": [_tensor([2, 1, 28, 28], "FP128", size=len(blob))]}, blob, 400,
         "unknown datatype FP128")
    case("shape not matching the bytes", {"inputs": [_tensor([3, 1, 28, 28], size=len(blob))]}, blob, 400,
         f"binary data has {len(blob)} bytes, shape [3, 1, 28, 28] of FP32 needs {3 * 784 * 4}")
    case("shape of another model", {"inputs": [_tensor([2, 3, 28, 28], size=len(blob))]}, blob, 400,
         "shape must be [N, 1, 28, 28]")
    case("data and binary both", {"inputs": [_tensor([2, 1, 28, 28], size=len(blob), data=[0.0] * 1568)]}, blob,
         400, "not both")
    case("binary_data_size not a number", {"inputs": [_tensor([2, 1, 28, 28], size="12")]}, blob, 400,
         "binary_data_size must be a whole number")
    case("no data at all", {"inputs": [_tensor([2, 1, 28, 28])]}, b"", 400, "no data")
    case("values out of range", {"inputs": [_tensor([2, 1, 28, 28], size=len(blob))]},
         (x * 300).tobytes(), 400, "values must be finite and within [0, 1]")
    case("NaN", {"inputs": [_tensor([1, 1, 28, 28], size=3136)]}, np.full(784, np.nan, "<f4").tobytes(), 400,
         "values must be finite")
    case("batch over the limit", {"inputs": [_tensor([65, 1, 28, 28], size=len(blob))]}, blob, 413,
         "batch of 65 exceeds the limit of 64")
    case("classification extension", {"inputs": [_tensor([2, 1, 28, 28], size=len(blob))],
                                       "outputs": [{"name": "label", "parameters": {"classification": 3}}]},
         blob, 400, "parameter 'classification' is not supported")
    case("binary_data not a bool", {"inputs": [_tensor([2, 1, 28, 28], size=len(blob))],
                                    "parameters": {"binary_data_output": "yes"}}, blob, 400, "must be true or false")
    case("gzip that is not", ok, blob, 400, "not valid gzip", **{"Content-Encoding": "gzip"})
    with served.srv.client(timeout=30) as c:
        for what, body, headers, status, error in cases:
            r = c.post(path, content=body, headers=headers)
            assert r.status_code == status, (what, r.text)
            assert error in r.json()["error"], (what, r.json())
        # a well-formed binary body, gzip-compressed as the Triton client sends it when asked
        body, headers = _binary_body(ok, blob)
        r = c.post(path, content=gzip.compress(body), headers={**headers, "Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text
        metrics = c.get("/metrics").text

    grpc_cases = _grpc_malformed(served, x)
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("dsphere_requests_total{") and 'endpoint="/v2/models/{name}/infer"' in line
                  and 'status="4' in line)
    assert counted >= len(cases)  # every malformed body answered and counted: none lost
    assert not [line for line in metrics.splitlines()
                if line.startswith("dsphere_requests_total{") and 'status="5' in line]
    assert grpc_cases >= 8
    assert "Traceback" not in served.srv.log_text()


def _grpc_malformed(served: Served, x: np.ndarray) -> int:
    from app.grpc_generated import grpc_predict_v2_pb2 as pb
    from app.grpc_generated import grpc_predict_v2_pb2_grpc as pb_grpc

    def req(shape, datatype="FP32", raw: list[bytes] | None = None, **kw) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name=MODEL_NAME, **kw)
        r.inputs.add(name="input", datatype=datatype, shape=shape)
        r.raw_input_contents.extend(raw if raw is not None else [x.tobytes()])
        return r

    blob = x.tobytes()
    both = req([2, 1, 28, 28])
    both.inputs[0].contents.fp32_contents.extend([0.0])
    ints = pb.ModelInferRequest(model_name=MODEL_NAME)
    ints.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28]).contents.int_contents.extend([0] * 784)
    cases = [
        (req([3, 1, 28, 28]), grpc.StatusCode.INVALID_ARGUMENT, "shape [3, 1, 28, 28] of FP32 needs"),
        (req([2, 1, 28, 28], raw=[blob[:-4]]), grpc.StatusCode.INVALID_ARGUMENT, "binary data has"),
        (req([2, 1, 28, 28], "INT8"), grpc.StatusCode.INVALID_ARGUMENT, "datatype must be FP32, got INT8"),
        (req([2, 1, 28, 28], raw=[blob, blob]), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries"),
        (both, grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        (ints, grpc.StatusCode.INVALID_ARGUMENT, "fp32_contents"),
        (req([65, 1, 28, 28]), grpc.StatusCode.RESOURCE_EXHAUSTED, "batch of 65 exceeds the limit of 64"),
        (req([2, 1, 28, 28], model_version="0.0.1"), grpc.StatusCode.NOT_FOUND, "not loaded"),
        (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
        (pb.ModelInferRequest(model_name=MODEL_NAME), grpc.StatusCode.INVALID_ARGUMENT, "exactly one input"),
    ]
    with grpc.insecure_channel(served.grpc_url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for request, code, message in cases:
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(request, timeout=30)
            assert e.value.code() == code and message in e.value.details(), (request.inputs, e.value.details())
        ok = stub.ModelInfer(req([2, 1, 28, 28]), timeout=30)  # the server keeps serving
        assert len(ok.raw_output_contents) == 4
    return len(cases)


def test_grpc_under_gunicorn_workers_share_the_port(tmp_path: Path) -> None:
    """Each worker's gRPC server binds the one port (SO_REUSEPORT); calls are answered, shutdown is clean."""
    port = free_port()
    with start_server({"DSPHERE_GRPC_PORT": str(port)}, workers=2, server="gunicorn",
                      log_path=tmp_path / "server.log") as srv:
        for _ in range(4):
            c = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{port}")
            assert c.is_server_ready() and c.is_model_ready(MODEL_NAME)
            c.close()
    log = srv.log_text()
    assert log.count(f"listening on 127.0.0.1:{port}") == 2 and log.count("gRPC server stopped") == 2, log[-3000:]
    assert "Traceback" not in log
