"""Request bodies read under a byte cap while streaming, multipart parsed in memory, and the
image uploads of the classifying routes.

The cap is enforced on the bytes actually received (Content-Length is only used
to refuse early when it already announces too much): `read_body` stops reading
and raises 413 as soon as the running total passes the limit. Multipart bodies
are fed chunk by chunk to python-multipart's parser, under the same cap.

`read_image` (POST /classify, /explain: multipart field `file`, or a raw `image/*` body) and
`read_images` (POST /classify/batch: repeated field `files`) answer the uploaded bytes, their
declared types checked (app/images.py decodes them); `multipart_body` documents either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import APIError
from app.images import SUPPORTED, check_content_type

MAX_PARTS = 4096
MAX_HEADER_BYTES = 16 * 1024


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds the limit of {limit} bytes")


def _check_declared_length(request: Request, limit: int) -> None:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise too_large(limit)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or APIError(413) once more than `limit` bytes have arrived."""
    _check_declared_length(request, limit)
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise too_large(limit)
    except ClientDisconnect:
        raise APIError(400, "client disconnected before the body was complete") from None
    return bytes(buf)


@dataclass
class Part:
    name: str = ""
    content_type: str = ""
    data: bytearray = field(default_factory=bytearray)


class _Collector:
    def __init__(self) -> None:
        self.parts: list[Part] = []
        self._part = Part()
        self._hname = b""
        self._hvalue = b""
        self._disposition = b""
        self._header_bytes = 0

    def on_part_begin(self) -> None:
        self._part = Part()
        self._disposition = b""
        self._header_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part.data += data[start:end]

    def on_part_end(self) -> None:
        self.parts.append(self._part)
        if len(self.parts) > MAX_PARTS:
            raise APIError(413, f"too many multipart parts (limit {MAX_PARTS})")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]
        self._count(end - start)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]
        self._count(end - start)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise APIError(400, "malformed multipart body: part headers too large")

    def on_header_end(self) -> None:
        name = self._hname.lower()
        if name == b"content-disposition":
            self._disposition = self._hvalue
        elif name == b"content-type":
            self._part.content_type = self._hvalue.decode("latin-1").strip()
        self._hname = b""
        self._hvalue = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise APIError(400, 'malformed multipart body: a part lacks Content-Disposition "name"')
        self._part.name = options[b"name"].decode("utf-8", "replace")


async def read_multipart(request: Request, limit: int) -> list[Part]:
    """Parse a multipart/form-data body of at most `limit` bytes into its parts."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise APIError(400, "malformed multipart body: missing boundary")
    _check_declared_length(request, limit)
    col = _Collector()
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": col.on_part_begin,
            "on_part_data": col.on_part_data,
            "on_part_end": col.on_part_end,
            "on_header_field": col.on_header_field,
            "on_header_value": col.on_header_value,
            "on_header_end": col.on_header_end,
            "on_headers_finished": col.on_headers_finished,
        },
    )
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect:
        raise APIError(400, "client disconnected before the body was complete") from None
    except FormParserError:
        raise APIError(400, "malformed multipart body") from None
    return col.parts


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_image(request: Request, limit: int) -> bytes:
    """The one image of multipart field `file`, or of a raw body with an image/* Content-Type."""
    mt = media_type(request)
    if mt == "multipart/form-data":
        files = _parts_named(await read_multipart(request, limit), "file")
        if not files:
            raise APIError(422, "missing multipart field 'file'")
        if len(files) > 1:
            raise APIError(422, f"expected one multipart field 'file', got {len(files)}; use /classify/batch")
        check_content_type(files[0].content_type)
        return bytes(files[0].data)
    if mt.startswith("image/"):
        check_content_type(mt)
        return await read_body(request, limit)
    raise APIError(
        415,
        f"unsupported content type '{mt}'; send multipart/form-data with a 'file' field "
        f"or a raw body with an image/* content type ({SUPPORTED})",
    )


async def read_images(request: Request, limit: int, max_files: int) -> list[bytes]:
    """The images of the repeated multipart field `files`, in order (at most `max_files`)."""
    mt = media_type(request)
    if mt != "multipart/form-data":
        raise APIError(415, f"unsupported content type '{mt}'; send multipart/form-data with 'files' fields")
    files = _parts_named(await read_multipart(request, limit), "files")
    if not files:
        raise APIError(422, "missing multipart field 'files'")
    if len(files) > max_files:
        raise APIError(413, f"too many files: {len(files)} (limit {max_files})")
    for i, f in enumerate(files):
        try:
            check_content_type(f.content_type)
        except APIError as exc:
            raise exc.within(f"files[{i}]") from None
    return [bytes(f.data) for f in files]


def _parts_named(parts: list[Part], name: str) -> list[Part]:
    return [p for p in parts if p.name == name]


def multipart_body(name: str, many: bool) -> dict[str, Any]:
    """`openapi_extra` of a route reading `read_image` (many=False) or `read_images` (many=True)."""
    prop: dict[str, Any] = {"type": "string", "format": "binary"}
    if many:
        prop = {"type": "array", "items": prop, "minItems": 1}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": [name], "properties": {name: prop}}
                },
                **(
                    {}
                    if many
                    else {"image/*": {"schema": {"type": "string", "format": "binary"}}}
                ),
            },
        }
    }
