"""Request bodies read under a byte cap while streaming, and multipart parsed in memory.

The cap is enforced on the bytes actually received (Content-Length is only used
to refuse early when it already announces too much): `read_body` stops reading
and raises 413 as soon as the running total passes the limit. Multipart bodies
are fed chunk by chunk to python-multipart's parser, under the same cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import APIError

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
    filename: str | None = None
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
        if b"filename" in options:
            self._part.filename = options[b"filename"].decode("utf-8", "replace")


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
