"""The REST body of a v2 inference request and response: JSON, or JSON followed by tensor bytes
(the binary tensor data extension).

Request: with an `Inference-Header-Content-Length: L` header the first L bytes are the JSON
inference request and the rest is the inputs' data, one after the other, each input that has
`"parameters": {"binary_data_size": k}` taking the next k bytes (FP32: little-endian, row-major).
Without the header the whole body is JSON. `Content-Encoding: gzip` or `deflate` (what the Triton
client sends when asked to compress) is inflated under the same byte cap as the body.

Response: an output whose `parameters.binary_data` is true (or every output, with the request
parameter `binary_data_output: true`, the Triton client's default) is sent as bytes after the JSON:
its JSON has `"parameters": {"binary_data_size": k}` and no `data`, the response carries
`Inference-Header-Content-Length` and is `application/octet-stream`; otherwise `application/json`.
BYTES (the `reason` output) are, element by element, a 4-byte little-endian length and the bytes.

Every malformed body is a 400 (413 past the caps) with the reason: a length that lies, sizes that
do not add up to the body, data given twice or not at all.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from app.errors import APIError, validation_message
from app.schemas import V2InferRequest
from app.uploads import too_large
from app.v2_tensors import ALL_OUTPUTS, InputTensor, check_parameters, json_values, raw_bytes, requested_outputs

HEADER_LENGTH = "Inference-Header-Content-Length"
_DIGITS = re.compile(r"^[0-9]{1,12}$")


@dataclass
class RestInferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[str]  # names, in the order asked (or the default outputs)
    binary: list[bool]  # per output: sent as bytes after the JSON


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before `Content-Encoding` (gzip, deflate, identity), at most `limit` bytes."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise APIError(415, f"unsupported Content-Encoding '{enc}'; gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error:
        raise APIError(400, f"invalid inference request: body is not valid {enc} data") from None
    if len(out) > limit or d.unconsumed_tail:
        raise too_large(limit)
    return out


def parse_request(body: bytes, header_length: str | None) -> RestInferRequest:
    """The inference request of a REST body (JSON, or JSON + the binary tensor data)."""
    if header_length is None:
        head, tail = body, b""
    else:
        if not _DIGITS.match(header_length.strip()):
            raise APIError(400, f"{HEADER_LENGTH} must be a number of bytes, got '{header_length[:40]}'")
        n = int(header_length)
        if n == 0 or n > len(body):
            raise APIError(400, f"{HEADER_LENGTH} is {n}, the body has {len(body)} bytes")
        head, tail = body[:n], body[n:]
    req = _json_request(head)
    check_parameters("request", req.parameters)
    inputs = _inputs(req, tail)
    for o in req.outputs or []:
        check_parameters(f"output '{o.name}'", o.parameters)
    names = requested_outputs([o.name for o in req.outputs] if req.outputs else None)
    default = _flag(req.parameters, "binary_data_output", "request", False)
    asked = {o.name: o.parameters for o in req.outputs or []}
    binary = [_flag(asked.get(n), "binary_data", f"output '{n}'", default) for n in names]
    return RestInferRequest(id=req.id, inputs=inputs, outputs=names, binary=binary)


def _json_request(head: bytes) -> V2InferRequest:
    try:
        payload: Any = json.loads(head)
        return V2InferRequest.model_validate(payload)
    except RecursionError:  # json.loads of arrays/objects nested thousands deep
        raise APIError(400, "invalid inference request: JSON nested too deeply") from None
    except ValidationError as exc:  # the first error
        raise APIError(400, f"invalid inference request: {validation_message(exc.errors()[:1])}") from None
    except ValueError:
        raise APIError(400, "invalid inference request: body is not valid JSON") from None


def _inputs(req: V2InferRequest, tail: bytes) -> list[InputTensor]:
    """Each input with its data: JSON `data`, or its binary_data_size bytes of `tail`, in order."""
    out, offset = [], 0
    for t in req.inputs:
        where = f"input '{t.name}'"
        check_parameters(where, t.parameters)
        size = (t.parameters or {}).get("binary_data_size")
        if size is None:
            if t.data is None:
                raise APIError(400, f"{where}: no data: give `data` or parameters.binary_data_size")
            out.append(InputTensor(t.name, t.datatype, t.shape, values=t.data))
            continue
        if type(size) is not int or size < 0:
            raise APIError(400, f"{where}: parameters.binary_data_size must be a whole number >= 0, got {size!r}")
        if t.data is not None:
            raise APIError(400, f"{where}: give `data` or parameters.binary_data_size, not both")
        if offset + size > len(tail):
            raise APIError(400, f"{where}: binary_data_size is {size}, {len(tail) - offset} bytes of binary data "
                                f"are left in the body")
        out.append(InputTensor(t.name, t.datatype, t.shape, raw=tail[offset:offset + size]))
        offset += size
    if offset != len(tail):
        raise APIError(400, f"{len(tail) - offset} bytes of binary data after the inputs' binary_data_size "
                            f"(Inference-Header-Content-Length or binary_data_size is wrong)")
    return out


def _flag(parameters: dict[str, Any] | None, key: str, where: str, default: bool) -> bool:
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise APIError(400, f"{where}: parameters.{key} must be true or false, got {value!r}")
    return value


def response_body(head: dict[str, Any], req: RestInferRequest,
                  arrays: dict[str, NDArray[Any]]) -> tuple[bytes, str, dict[str, str]]:
    """(body, media type, headers) of the response: `head` (model_name, model_version, id) and the
    outputs asked for, each as JSON `data` or as bytes after the JSON."""
    outputs, blobs = [], []
    for name, binary in zip(req.outputs, req.binary, strict=True):
        dt, arr = ALL_OUTPUTS[name], arrays[name]
        tensor: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(np.shape(arr))}
        if binary:
            blob = raw_bytes(dt, arr)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = json_values(dt, arr)
        outputs.append(tensor)
    text = json.dumps({**head, "outputs": outputs}, separators=(",", ":")).encode()
    if not blobs:
        return text, "application/json", {}
    return text + b"".join(blobs), "application/octet-stream", {HEADER_LENGTH: str(len(text))}
