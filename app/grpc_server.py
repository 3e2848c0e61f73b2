"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` (ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelInfer) on its own port, off unless
DSPHERE_GRPC_PORT is set.

A grpc.aio server on the app's own event loop, started and stopped by its lifespan (app/main.py):
every inference goes through the one Service (`Service.classify`: query history, result cache,
micro-batcher, verdict, metrics, quarantine) with the REST routes' checks, limits and messages
(app/v2_tensors.py). Messages over DSPHERE_MAX_BATCH_UPLOAD_BYTES are refused by gRPC itself
(RESOURCE_EXHAUSTED). Errors: 400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, 413 -> RESOURCE_EXHAUSTED,
503 (not ready, queue full, shutting down) -> UNAVAILABLE, 500 -> INTERNAL. Each call is counted in
dsphere_requests_total / dsphere_request_duration_seconds with endpoint
"/inference.GRPCInferenceService/<method>" and the HTTP status the outcome stands for.

Inputs as `raw_input_contents` get their outputs as `raw_output_contents` (what the Triton client
sends and reads); inputs as `contents.fp32_contents` get outputs in `contents`. The request's
`x-request-id` metadata (if well-formed) is the request id, else a new one; it comes back as
trailing metadata `x-request-id`, and is the response's `id` when the request has none.

Shutdown: the lifespan stops the server after uvicorn has drained HTTP: new calls are refused,
calls in flight get GRACE_S seconds, then the service's queue is drained. With several workers
(gunicorn), each worker's server binds the same port with SO_REUSEPORT (grpcio's default on
Linux, set here explicitly) and the kernel spreads connections over them; a gRPC connection is
long-lived, so one client channel stays on one worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc import aio
from numpy.typing import NDArray

from app.engine import EngineClosedError, EngineError, QueueFullError
from app.errors import APIError
from app.service import NotReadyError, Service
from app.v2_tensors import (
    ALL_OUTPUTS,
    InputTensor,
    check_parameters,
    classify,
    input_array,
    model_metadata,
    output_arrays,
    raw_bytes,
    requested_outputs,
    served,
    server_metadata,
)

# protoc's output (a package, not a module of app/; imports grpc and protobuf only): app/grpc_generated/
from .grpc_generated import grpc_predict_v2_pb2 as pb  # noqa: I001
from .grpc_generated import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger("dsphere.grpc")

SERVICE = "inference.GRPCInferenceService"
GRACE_S = 5.0
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
          503: grpc.StatusCode.UNAVAILABLE}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Method = Callable[[Any, Req, aio.ServicerContext], Awaitable[Resp]]


def _outcome(exc: Exception) -> tuple[int, str]:
    """The HTTP status and message an error stands for (as app/error_handlers.py answers it)."""
    if isinstance(exc, APIError):
        return exc.status_code, exc.detail
    if isinstance(exc, NotReadyError | QueueFullError | EngineClosedError):
        return 503, str(exc)
    if isinstance(exc, EngineError):
        return 500, f"inference failed: {exc}"
    log.error("unhandled error on gRPC %s", type(exc).__name__, exc_info=exc)
    return 500, "internal server error"


def _rpc(fn: Method[Req, Resp]) -> Method[Req, Resp]:
    """Counted in the request metrics; an error becomes the protocol's status with its message."""
    endpoint = f"/{SERVICE}/{fn.__name__}"

    @functools.wraps(fn)
    async def wrapper(self: Servicer, request: Req, context: aio.ServicerContext) -> Resp:
        t0, status, message = time.perf_counter(), 500, "internal server error"
        try:
            try:
                response = await fn(self, request, context)
                status = 200
                return response
            except asyncio.CancelledError:
                status = 499  # the client went away
                raise
            except Exception as exc:
                status, message = _outcome(exc)
            await context.abort(_CODES.get(status, grpc.StatusCode.INTERNAL), message)
            raise AssertionError("unreachable: abort raises")  # pragma: no cover
        finally:
            m = self.svc.metrics
            m.request_duration.labels(endpoint).observe(time.perf_counter() - t0)
            m.requests.labels(endpoint, str(status)).inc()

    return wrapper


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, svc: Service) -> None:
        self.svc = svc

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: aio.ServicerContext) -> pb.ServerReadyResponse:
        try:
            self.svc.current()
        except NotReadyError:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        """ready false while loading, for another model and for a version not loaded (REST: 503, 404)."""
        try:
            served(self.svc, request.name, request.version)
        except APIError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**server_metadata())

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: aio.ServicerContext) -> pb.ModelMetadataResponse:
        meta = model_metadata(served(self.svc, request.name, request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        rid = _request_id(context)
        context.set_trailing_metadata((("x-request-id", rid),))
        svc = self.svc
        rt = served(svc, request.model_name, request.model_version)
        check_parameters("request", dict(request.parameters))
        for o in request.outputs:
            check_parameters(f"output '{o.name}'", dict(o.parameters))
        names = requested_outputs([o.name for o in request.outputs] or None)
        x = input_array(_inputs(request), rt, svc.settings.max_batch_files)
        with rt.ticket() as ticket:
            v = await classify(svc, rt, x, ticket, rid)
        arrays = output_arrays(v)
        response = pb.ModelInferResponse(model_name=rt.name, model_version=rt.version, id=request.id or rid)
        raw = bool(request.raw_input_contents)
        for n in names:
            dt, arr = ALL_OUTPUTS[n], arrays[n]
            out = response.outputs.add(name=n, datatype=dt, shape=[len(arr)])
            if raw:
                response.raw_output_contents.append(raw_bytes(dt, arr))
            else:
                _set_contents(out.contents, dt, arr)
        return response


def _request_id(context: aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _RID.match(value):
            return value
    return uuid.uuid4().hex


def _inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    """Each input with its data: `raw_input_contents` (one per input, in order) or `contents`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise APIError(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input(s)")
    out = []
    for i, t in enumerate(request.inputs):
        where = f"input '{t.name}'"
        check_parameters(where, dict(t.parameters))
        has_contents = t.HasField("contents")
        if raw:
            if has_contents:
                raise APIError(400, f"{where}: give contents or raw_input_contents, not both")
            out.append(InputTensor(t.name, t.datatype, list(t.shape), raw=raw[i]))
            continue
        c = t.contents
        others = [f.name for f, _ in c.ListFields() if f.name != "fp32_contents"]
        if t.datatype == "FP32" and others:
            raise APIError(400, f"{where}: FP32 data goes in contents.fp32_contents, got {others}")
        out.append(InputTensor(t.name, t.datatype, list(t.shape), values=np.asarray(c.fp32_contents, np.float32)))
    return out


def _set_contents(contents: pb.InferTensorContents, datatype: str, arr: NDArray[Any]) -> None:
    values = arr.tolist()
    if datatype == "INT64":
        contents.int64_contents.extend(values)
    elif datatype == "FP64":
        contents.fp64_contents.extend(values)
    elif datatype == "BOOL":
        contents.bool_contents.extend(values)
    else:  # BYTES
        contents.bytes_contents.extend(values)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start(svc: Service) -> aio.Server:
    """The gRPC server on DSPHERE_GRPC_HOST:DSPHERE_GRPC_PORT, started; raises when the port cannot be bound."""
    s = svc.settings
    assert s.grpc_port is not None
    server = aio.server(options=[
        ("grpc.max_receive_message_length", s.max_batch_upload_bytes),
        ("grpc.so_reuseport", 1),  # several workers (gunicorn) share the port
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(svc), server)
    where = address(s.grpc_host, s.grpc_port)
    try:
        server.add_insecure_port(where)
    except RuntimeError as exc:
        raise RuntimeError(f"gRPC server: cannot bind {where} ({exc})") from None
    await server.start()
    log.info("gRPC (Open Inference Protocol, %s) listening on %s", SERVICE, where)
    return server


async def stop(server: aio.Server) -> None:
    """Refuse new calls; those in flight get GRACE_S seconds."""
    await server.stop(GRACE_S)
    log.info("gRPC server stopped")
