"""The transports side by side: /classify (one PNG), /classify/batch (B PNGs), Open Inference Protocol v2
REST with JSON tensors and with binary tensors, and gRPC (raw_input_contents), B Fashion-MNIST images a
request on the v2 routes. Prints req/s, images/s, p50 and p99 per transport (a Markdown table).

    python bench/bench_v2.py [--batch 16] [--concurrency 8] [--duration 5] [--model fashion-mnist-dsphere]

One `uvicorn app.main:app` with DSPHERE_GRPC_PORT (support/server.py: bundled store, one inference
thread), the result cache off (DSPHERE_QUERY_HISTORY_RESULT_CACHE=0) so that every request runs the
model. The load comes from this process, the same for every transport: C asyncio connections, each
sending one prebuilt request after the other (HTTP/1.1 keep-alive over a raw socket; gRPC through
grpc.aio with the request serialized once), so the client's own cost is the same small one for all.
Every answer is checked to be a success. The JSON body and the binary body carry the same float32 values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.grpc_generated import grpc_predict_v2_pb2 as pb  # noqa: E402
from support.fashion_mnist import load_fashion_mnist_test, png_bytes  # noqa: E402
from support.server import free_port, start_server  # noqa: E402

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def multipart(field: str, files: list[bytes]) -> tuple[bytes, str]:
    boundary = "dsphere-bench-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + f + b"\r\n" for i, f in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def http_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: bench", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def v2_bodies(x: np.ndarray) -> tuple[tuple[bytes, dict[str, str]], tuple[bytes, dict[str, str]], bytes]:
    """(JSON body, headers), (binary body, headers), serialized gRPC request: the same tensor x."""
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    as_json = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    binary = head + x.astype("<f4").tobytes()
    req = pb.ModelInferRequest()
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    return ((as_json, {"Content-Type": "application/json"}),
            (binary, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}),
            req.SerializeToString())


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return status


async def drive(one: Callable[[], Awaitable[None]], concurrency: int, duration: float) -> list[float]:
    """Latencies (s) of every request that `concurrency` loops of `one()` completed in `duration` s."""
    lat: list[float] = []
    end = time.perf_counter() + duration

    async def loop() -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await one()
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return lat


async def bench_http(port: int, request: bytes, concurrency: int, duration: float) -> list[float]:
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    free = asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]()
    for c in conns:
        free.put_nowait(c)

    async def one() -> None:
        reader, writer = await free.get()
        writer.write(request)
        status = await _read_response(reader)
        free.put_nowait((reader, writer))
        if status != 200:
            raise RuntimeError(f"HTTP {status}")

    await drive(one, concurrency, 0.5)  # warm-up
    lat = await drive(one, concurrency, duration)
    for _, w in conns:
        w.close()
    return lat


async def bench_grpc(port: int, request: bytes, concurrency: int, duration: float) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)

        async def one() -> None:
            await call(request)  # raises on any status but OK

        await drive(one, concurrency, 0.5)
        return await drive(one, concurrency, duration)


def row(name: str, lat: list[float], duration: float, images: int) -> str:
    ms = np.asarray(lat) * 1e3
    rps = len(lat) / duration
    return (f"| {name} | {images} | {rps:,.0f} | {rps * images:,.0f} | {np.percentile(ms, 50):.2f} | "
            f"{np.percentile(ms, 99):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--model", default=None, help="DSPHERE_MODEL_NAME (default: the service's)")
    a = ap.parse_args()

    imgs = load_fashion_mnist_test(a.batch)
    x = imgs.astype(np.float32)[:, None] / np.float32(255)
    (js, jh), (bb, bh), grpc_request = v2_bodies(x)
    one_png, one_ct = multipart("file", [png_bytes(imgs[0])])
    many, many_ct = multipart("files", [png_bytes(i) for i in imgs])
    gport = free_port()
    env = {"DSPHERE_GRPC_PORT": str(gport), "DSPHERE_QUERY_HISTORY_RESULT_CACHE": "0",
           "DSPHERE_MAX_BATCH_FILES": str(max(64, a.batch))} | ({"DSPHERE_MODEL_NAME": a.model} if a.model else {})
    with start_server(env) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        model = srv.client().get("/readyz").json()["model"]
        path = f"/v2/models/{model['name']}/infer"
        runs = [
            ("/classify (1 PNG)", 1, bench_http(port, http_request("/classify", one_png, {"Content-Type": one_ct}),
                                                a.concurrency, a.duration)),
            (f"/classify/batch ({a.batch} PNGs)", a.batch,
             bench_http(port, http_request("/classify/batch", many, {"Content-Type": many_ct}), a.concurrency,
                        a.duration)),
            ("V2 REST, JSON tensors", a.batch, bench_http(port, http_request(path, js, jh), a.concurrency, a.duration)),
            ("V2 REST, binary tensors", a.batch, bench_http(port, http_request(path, bb, bh), a.concurrency,
                                                             a.duration)),
            ("V2 gRPC (raw contents)", a.batch, None),
        ]
        req = pb.ModelInferRequest.FromString(grpc_request)
        req.model_name = model["name"]
        grpc_bytes = req.SerializeToString()
        print(f"model {model['name']}/{model['version']}, batch {a.batch}, concurrency {a.concurrency}, "
              f"{a.duration:g} s each, result cache off\n")
        print("| transport | images/request | req/s | images/s | p50 ms | p99 ms |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, n, job in runs:
            lat = asyncio.run(job if job is not None else bench_grpc(gport, grpc_bytes, a.concurrency, a.duration))
            print(row(name, lat, a.duration, n), flush=True)
        metrics = srv.client().get("/metrics").text
    errors = [ln for ln in metrics.splitlines() if ln.startswith("dsphere_requests_total{") and 'status="2' not in ln]
    if errors:
        raise SystemExit("non-2xx answers during the bench:\n" + "\n".join(errors))


if __name__ == "__main__":
    main()
