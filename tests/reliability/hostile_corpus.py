"""Hostile and odd uploads, generated (Pillow, hand-built PNG/GIF/JPEG/TIFF headers), never stored.

Each `Kind` is one kind of request to POST /classify with the status the API defines for it
(docs/API.md "Errors": 400 undecodable/truncated/malformed, 413 too many bytes/pixels/parts,
415 unsupported type or format, 422 missing field, 200 for odd but valid images) and, where it
makes sense, the same upload to POST /classify/batch. `V2Kind` is one body for
POST /v2/models/{name}/infer.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from support.fashion_mnist import load_fashion_mnist_test

MiB = 1024 * 1024
BIG_BODY = 40 * MiB  # over both caps (10 MiB /classify, 32 MiB batch and v2)
BOMB_SIDE = 30_000  # 9e8 pixels: over 2x the 4096x4096 cap, so Pillow itself refuses it at open()
Request = dict[str, Any]  # keyword arguments of httpx.Client.post


# ----------------------------------------------------------------------------- image bytes
@functools.cache
def garment() -> np.ndarray:
    """A real Fashion-MNIST test image, uint8 [28, 28]."""
    return np.array(load_fashion_mnist_test(1)[0])


def save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gray() -> Image.Image:
    return Image.fromarray(garment(), mode="L")


def png() -> bytes:
    return save(gray(), "PNG")


def jpeg() -> bytes:
    return save(gray(), "JPEG", quality=90)


def gif() -> bytes:
    return save(gray(), "GIF")


def tiff() -> bytes:
    return save(gray(), "TIFF")


def webp() -> bytes:
    return save(gray(), "WEBP", lossless=True)


def bmp() -> bytes:
    return save(gray(), "BMP")


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_ihdr(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))


@functools.cache
def png_zero_bomb(side: int, bit_depth: int = 1) -> bytes:
    """A VALID grayscale PNG of side x side black pixels: rows of zeros deflate ~1000:1."""
    row = b"\x00" * (1 + (side * bit_depth + 7) // 8)  # filter byte + packed pixels
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return PNG_SIGNATURE + png_ihdr(side, side, bit_depth) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_header_only(width: int = 28, height: int = 28) -> bytes:
    """Signature + IHDR + IEND: a size, but no pixel data at all."""
    return PNG_SIGNATURE + png_ihdr(width, height) + png_chunk(b"IEND", b"")


def png_bad_crc(chunk: bytes) -> bytes:
    """A valid PNG whose `chunk` (b"IHDR" or b"IDAT") has its CRC flipped."""
    data = bytearray(png())
    i = data.index(chunk)
    length = struct.unpack(">I", data[i - 4 : i])[0]
    crc_at = i + 4 + length
    data[crc_at : crc_at + 4] = bytes(b ^ 0xFF for b in data[crc_at : crc_at + 4])
    return bytes(data)


def png_corrupt_idat() -> bytes:
    """A PNG whose deflate stream is damaged (bytes flipped) but whose IDAT CRC matches again."""
    data = bytearray(png())
    i = data.index(b"IDAT")
    length = struct.unpack(">I", data[i - 4 : i])[0]
    body = bytearray(data[i + 4 : i + 4 + length])
    for j in range(2, len(body) - 4, 7):
        body[j] ^= 0x5A
    return bytes(data[: i - 4]) + png_chunk(b"IDAT", bytes(body)) + bytes(data[i + 8 + length :])


def gif_screen(width: int, height: int, frame_side: int = 1) -> bytes:
    """A GIF whose logical screen is width x height, with one frame_side x frame_side frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, frame_side, frame_side, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(jpeg())
    i = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_with_size(width: int, height: int) -> bytes:
    """A minimal little-endian TIFF header claiming width x height 8-bit gray, one tiny strip."""
    entries = [
        (256, 4, 1, width),  # ImageWidth, LONG
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: black is zero
        (273, 4, 1, 8 + 2 + 12 * 8 + 4),  # StripOffsets: right after the IFD
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHII", tag, typ, count, value) if typ == 4 else struct.pack("<HHIHH", tag, typ, count,
                                                                                         value, 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + b"\x00" * 16


def animated(fmt: str) -> bytes:
    frames = [gray(), Image.fromarray(255 - garment(), mode="L"), Image.fromarray(garment()[::-1].copy(), mode="L")]
    extra = {"loop": 0, "duration": 100} if fmt in ("GIF", "WEBP") else {}
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], **extra)


def sixteen_bit_png() -> bytes:
    return save(Image.fromarray(garment().astype(np.uint16) * 257), "PNG")


def float_tiff() -> bytes:
    return save(Image.fromarray(garment().astype(np.float32) / 255), "TIFF")


def strip(width: int, height: int) -> bytes:
    return save(Image.fromarray(np.resize(garment(), (height, width))), "PNG")


@functools.cache
def square(side: int) -> bytes:
    """A valid PNG of side x side (mostly black), exactly at or under the pixel cap."""
    a = np.zeros((side, side), np.uint8)
    a[: side // 2, : side // 2] = 200
    return save(Image.fromarray(a), "PNG")


def pdf() -> bytes:
    return save(gray().convert("RGB"), "PDF")


def ico() -> bytes:
    return save(gray(), "ICO")


def svg() -> bytes:
    return (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="28" height="28">'
        b'<rect width="28" height="28" fill="white"/><script>alert(1)</script></svg>'
    )


HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)><h1>not an image</h1></body></html>"
TEXT = b"hello, I am definitely a sneaker\n" * 10


@functools.cache
def big_bytes() -> bytes:
    """40 MiB that start like a PNG (then zeros)."""
    return png() + b"\x00" * (BIG_BODY - len(png()))


# ----------------------------------------------------------------------------- requests
def multipart(field: str, data: bytes, filename: str | None = "x.png", ctype: str | None = "image/png") -> Request:
    if ctype is None:
        return {"files": {field: (filename, data)}}
    return {"files": {field: (filename, data, ctype)}}


def raw_multipart(body: bytes, boundary: str | None = "b0undary") -> Request:
    ct = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    return {"content": body, "headers": {"content-type": ct}}


def part(name: str | None, data: bytes, filename: str | None = "x.png", ctype: str | None = "image/png",
         boundary: str = "b0undary") -> bytes:
    disp = "form-data" + (f'; name="{name}"' if name is not None else "")
    disp += f'; filename="{filename}"' if filename is not None else ""
    head = f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
    head += f"Content-Type: {ctype}\r\n" if ctype else ""
    return head.encode() + b"\r\n" + data + b"\r\n"


def end(boundary: str = "b0undary") -> bytes:
    return f"--{boundary}--\r\n".encode()


def chunks(data: bytes, size: int = MiB) -> Iterator[bytes]:
    """A generator body: httpx sends it chunked, with no Content-Length to refuse early."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


@dataclass(frozen=True)
class Kind:
    """One kind of upload: expected status on /classify and (if not None) on /classify/batch."""

    id: str
    classify: int
    batch: int | None
    request: Callable[[str], Request]  # field name ("file" or "files") -> httpx.post kwargs


def file_kind(id: str, status: int, data: Callable[[], bytes], filename: str | None = "x.png",
              ctype: str | None = "image/png", batch: int | None = -1) -> Kind:
    """One file in the multipart field: the same upload goes to both endpoints."""
    return Kind(id, status, status if batch == -1 else batch, lambda f: multipart(f, data(), filename, ctype))


def raw_kind(id: str, status: int, data: Callable[[], bytes], ctype: str | None,
             batch: int | None = 415) -> Kind:
    """A raw body (no multipart); /classify/batch only takes multipart (415)."""
    def req(_: str) -> Request:
        return {"content": data(), "headers": {"content-type": ctype} if ctype is not None else {}}
    return Kind(id, status, batch, req)


def structural_kind(id: str, status: int, build: Callable[[str], Request], batch: int | None = -1) -> Kind:
    return Kind(id, status, status if batch == -1 else batch, build)


def _wrong_field(field: str) -> Request:
    return multipart("image" if field == "file" else "file", png())


def _two_parts(field: str) -> Request:
    return {"files": [(field, ("a.png", png(), "image/png")), (field, ("b.png", png(), "image/png"))]}


def _many_parts(field: str) -> Request:
    body = b"".join(part("junk", b"x", filename=None, ctype=None) for _ in range(5000))
    return raw_multipart(body + part(field, png()) + end())


def _nameless_part(field: str) -> Request:
    return raw_multipart(part(None, png()) + end())


def _huge_part_headers(field: str) -> Request:
    return raw_multipart(part(field, png(), filename="a" * 20_000 + ".png") + end())


def _unterminated(field: str) -> Request:
    return raw_multipart(part(field, png())[:-40])


def _garbage_multipart(field: str) -> Request:
    return raw_multipart(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _no_boundary(field: str) -> Request:
    return raw_multipart(part(field, png()) + end(), boundary=None)


def _big_multipart(field: str) -> Request:
    return multipart(field, big_bytes())


def _big_chunked(field: str) -> Request:
    return {"content": chunks(big_bytes()), "headers": {"content-type": "image/png"}}


def _big_chunked_multipart(field: str) -> Request:
    return {"content": chunks(part(field, big_bytes()) + end()),
            "headers": {"content-type": "multipart/form-data; boundary=b0undary"}}


def _json(field: str) -> Request:
    return {"json": {field: "iVBORw0KGgo=", "note": "a JSON body is not an upload"}}


def _form(field: str) -> Request:
    return {"data": {field: "not a file"}}


def _crlf_filename(field: str) -> Request:
    return raw_multipart(part(field, png(), filename='x.png"\r\nContent-Type: text/html\r\nX-Evil: "1') + end())


def _batch_too_many(field: str) -> Request:
    return {"files": [(field, (f"{i}.png", png(), "image/png")) for i in range(65)]}


def _batch_one_bad(field: str) -> Request:
    return {"files": [(field, ("good.png", png(), "image/png")), (field, ("bad.png", png()[:60], "image/png"))]}


def corpus() -> list[Kind]:
    random_bytes = np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    return [
        # --- not images at all
        file_kind("empty", 400, lambda: b""),
        file_kind("empty-no-part-type", 400, lambda: b"", ctype=None),
        file_kind("text-plain", 415, lambda: TEXT, "notes.txt", "text/plain"),
        file_kind("text-labelled-png", 400, lambda: TEXT),
        file_kind("html", 415, lambda: HTML, "index.html", "text/html"),
        file_kind("html-octet-stream", 400, lambda: HTML, "index.html", "application/octet-stream"),
        file_kind("svg", 415, svg, "pic.svg", "image/svg+xml"),
        file_kind("svg-labelled-png", 400, svg),
        file_kind("pdf", 415, pdf, "doc.pdf", "application/pdf"),
        file_kind("pdf-octet-stream", 400, pdf, "doc.pdf", "application/octet-stream"),
        file_kind("ico-labelled-png", 415, ico),
        file_kind("random-bytes", 400, lambda: random_bytes),
        # --- truncated, corrupt, header-only
        file_kind("truncated-png", 400, lambda: png()[: len(png()) // 2]),
        file_kind("truncated-jpeg", 400, lambda: jpeg()[: len(jpeg()) // 2], ctype="image/jpeg"),
        file_kind("truncated-gif", 400, lambda: gif()[: len(gif()) // 2], ctype="image/gif"),
        file_kind("truncated-tiff", 400, lambda: tiff()[: len(tiff()) // 2], ctype="image/tiff"),
        file_kind("truncated-webp", 400, lambda: webp()[: len(webp()) // 2], ctype="image/webp"),
        file_kind("truncated-bmp", 400, lambda: bmp()[: len(bmp()) // 2], ctype="image/bmp"),
        file_kind("png-bad-crc-ihdr", 400, lambda: png_bad_crc(b"IHDR")),
        # Pillow does not verify the CRC of IDAT (the pixel data): intact pixels still decode
        file_kind("png-bad-crc-idat", 200, lambda: png_bad_crc(b"IDAT")),
        file_kind("png-corrupt-idat", 400, png_corrupt_idat),
        file_kind("png-header-only", 400, png_header_only),
        file_kind("jpeg-header-only", 400, lambda: jpeg()[:20], ctype="image/jpeg"),
        file_kind("gif-header-only", 400, lambda: gif()[:13], ctype="image/gif"),
        file_kind("tiff-short-strip", 400, lambda: tiff_with_size(28, 28), ctype="image/tiff"),
        # --- too many pixels (decompression bombs) and zero-size images
        file_kind("png-bomb-30000", 413, lambda: png_zero_bomb(BOMB_SIDE)),
        file_kind("png-bomb-5000", 413, lambda: png_zero_bomb(5000, 8)),
        file_kind("png-header-claims-60000", 413, lambda: png_header_only(60_000, 60_000)),
        file_kind("gif-screen-65535", 413, lambda: gif_screen(65_535, 65_535), ctype="image/gif"),
        file_kind("jpeg-sof-60000", 413, lambda: jpeg_with_size(60_000, 60_000), ctype="image/jpeg"),
        file_kind("tiff-header-100000", 413, lambda: tiff_with_size(100_000, 100_000), ctype="image/tiff"),
        file_kind("png-zero-width", 400, lambda: png_header_only(0, 28)),
        file_kind("gif-zero-size", 400, lambda: gif_screen(0, 0, frame_side=0), ctype="image/gif"),
        # Pillow grows a GIF's 0x0 logical screen to its 1x1 frame: a valid 1x1 image
        file_kind("gif-screen-0x0-frame-1x1", 200, lambda: gif_screen(0, 0), ctype="image/gif"),
        file_kind("tiff-zero-height", 400, lambda: tiff_with_size(28, 0), ctype="image/tiff"),
        # --- odd but valid images: 200
        file_kind("jpeg-cmyk", 200, lambda: save(gray().convert("CMYK"), "JPEG"), ctype="image/jpeg"),
        file_kind("png-16-bit", 200, sixteen_bit_png),
        file_kind("png-palette", 200, lambda: save(gray().convert("P"), "PNG")),
        file_kind("png-1-bit", 200, lambda: save(gray().convert("1"), "PNG")),
        file_kind("png-rgba", 200, lambda: save(gray().convert("RGBA"), "PNG")),
        file_kind("png-la", 200, lambda: save(gray().convert("LA"), "PNG")),
        file_kind("tiff-float32", 200, float_tiff, ctype="image/tiff"),
        file_kind("gif-animated", 200, lambda: animated("GIF"), ctype="image/gif"),
        file_kind("webp-animated", 200, lambda: animated("WEBP"), ctype="image/webp"),
        file_kind("tiff-multipage", 200, lambda: animated("TIFF"), ctype="image/tiff"),
        file_kind("bmp", 200, bmp, ctype="image/bmp"),
        file_kind("png-1x1", 200, lambda: strip(1, 1)),
        file_kind("png-1x5000", 200, lambda: strip(1, 5000)),
        file_kind("png-5000x1", 200, lambda: strip(5000, 1)),
        file_kind("png-4096x4096-at-cap", 200, lambda: square(4096)),
        file_kind("png-trailing-garbage", 200, lambda: png() + b"\x00garbage" * 100),
        # --- declared type vs bytes: the bytes decide among allowed types
        file_kind("png-labelled-jpeg", 200, png, "x.jpg", "image/jpeg"),
        file_kind("jpeg-labelled-gif", 200, jpeg, "x.gif", "image/gif"),
        file_kind("png-no-part-type", 200, png, ctype=None),
        file_kind("png-octet-stream", 200, png, ctype="application/octet-stream"),
        file_kind("png-labelled-text", 415, png, ctype="text/plain"),
        file_kind("png-labelled-svg", 415, png, ctype="image/svg+xml"),
        # --- odd file names: never used as paths
        file_kind("filename-traversal", 200, png, "../../../../etc/passwd"),
        file_kind("filename-absolute", 200, png, "/etc/shadow"),
        file_kind("filename-unicode", 200, png, "👟 ßnëåkér ☃ \u202eGNP.exe"),
        file_kind("filename-long-4000", 200, png, "n" * 4000 + ".png"),
        file_kind("filename-none", 200, png, None),
        structural_kind("filename-crlf-injection", 200, _crlf_filename),
        # --- multipart structure
        structural_kind("multipart-no-boundary", 400, _no_boundary),
        structural_kind("multipart-garbage", 400, _garbage_multipart),
        # the unfinished part never completes, so there is no 'file' field
        structural_kind("multipart-unterminated", 422, _unterminated),
        structural_kind("multipart-5000-parts", 413, _many_parts),
        structural_kind("multipart-nameless-part", 400, _nameless_part),
        structural_kind("multipart-20k-part-headers", 400, _huge_part_headers),
        structural_kind("wrong-field-name", 422, _wrong_field),
        structural_kind("two-file-parts", 422, _two_parts, batch=200),
        structural_kind("body-40mb-multipart", 413, _big_multipart),
        structural_kind("body-40mb-chunked-multipart", 413, _big_chunked_multipart),
        structural_kind("batch-65-files", 422, _batch_too_many, batch=413),
        structural_kind("batch-one-bad-file", 422, _batch_one_bad, batch=400),
        # --- raw bodies
        raw_kind("raw-png", 200, png, "image/png"),
        raw_kind("raw-jpeg-labelled-png", 200, jpeg, "image/png"),
        raw_kind("raw-empty-png", 400, lambda: b"", "image/png"),
        raw_kind("raw-png-as-json", 415, png, "application/json"),
        raw_kind("raw-png-octet-stream", 415, png, "application/octet-stream"),
        raw_kind("raw-png-no-content-type", 415, png, None),
        raw_kind("raw-text-plain", 415, lambda: TEXT, "text/plain"),
        raw_kind("raw-svg", 415, svg, "image/svg+xml"),
        raw_kind("raw-html-labelled-png", 400, lambda: HTML, "image/png"),
        raw_kind("raw-40mb-png", 413, big_bytes, "image/png"),
        structural_kind("raw-40mb-chunked", 413, _big_chunked, batch=415),
        structural_kind("json-body", 415, _json, batch=415),
        structural_kind("form-urlencoded", 415, _form, batch=415),
    ]


# ----------------------------------------------------------------------------- v2 infer
@dataclass(frozen=True)
class V2Kind:
    id: str
    status: int
    request: Callable[[], Request]


def _tensor(data: Any, shape: list[Any] | None = None, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": shape or [1, 1, 28, 28], "datatype": datatype, "data": data}],
            **extra}


def _json_body(obj: Any) -> Callable[[], Request]:
    return lambda: {"content": json.dumps(obj).encode(), "headers": {"content-type": "application/json"}}


def _raw_body(body: bytes | Callable[[], bytes], ctype: str = "application/json") -> Callable[[], Request]:
    return lambda: {"content": body() if callable(body) else body, "headers": {"content-type": ctype}}


def _pixels() -> list[float]:
    return (garment().astype(np.float32) / 255).ravel().tolist()


def v2_corpus() -> list[V2Kind]:
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        V2Kind("valid", 200, lambda: _json_body(_tensor(_pixels()))()),
        V2Kind("valid-nested-data", 200, lambda: _json_body(_tensor(np.reshape(_pixels(), (1, 1, 28, 28)).tolist()))()),
        V2Kind("valid-text-plain-type", 200, lambda: _raw_body(json.dumps(_tensor(_pixels())).encode(),
                                                               "text/plain")()),
        V2Kind("bool-data", 200, lambda: _json_body(_tensor([True] * 784))()),
        V2Kind("empty-body", 400, _raw_body(b"")),
        V2Kind("not-json", 400, _raw_body(b"{inputs: nope")),
        V2Kind("json-array", 400, _json_body([1, 2, 3])),
        V2Kind("json-string", 400, _json_body("infer please")),
        V2Kind("json-null", 400, _json_body(None)),
        V2Kind("no-inputs", 400, _json_body({"id": "x"})),
        V2Kind("two-inputs", 400, lambda: _json_body({"inputs": _tensor(_pixels())["inputs"] * 2})()),
        V2Kind("datatype-int8", 400, lambda: _json_body(_tensor([0] * 784, datatype="INT8"))()),
        V2Kind("shape-3d", 400, lambda: _json_body(_tensor(_pixels(), [1, 28, 28]))()),
        V2Kind("shape-n0", 400, _json_body(_tensor([], [0, 1, 28, 28]))),
        V2Kind("shape-negative", 400, _json_body(_tensor([0.0], [-1, 1, 28, 28]))),
        V2Kind("shape-float", 400, _json_body(_tensor([0.0], [1.5, 1, 28, 28]))),
        V2Kind("shape-n-1e9", 413, _json_body(_tensor([0.0], [10**9, 1, 28, 28]))),
        V2Kind("data-too-short", 400, _json_body(_tensor([0.5] * 100))),
        V2Kind("data-strings", 400, _json_body(_tensor(["0.5"] * 784))),
        V2Kind("data-objects", 400, _json_body(_tensor([{}] * 784))),
        V2Kind("data-ragged", 400, _json_body(_tensor([[0.5] * 28, [0.5]] * 392))),
        V2Kind("data-null", 400, _json_body(_tensor(None))),
        V2Kind("data-nan", 400, _raw_body(json.dumps(_tensor([0.5] * 783 + [float("nan")])).encode())),
        V2Kind("data-infinity", 400, _raw_body(json.dumps(_tensor([0.5] * 783 + [float("inf")])).encode())),
        V2Kind("data-out-of-range", 400, _json_body(_tensor([2.0] * 784))),
        V2Kind("data-huge-int", 400, _raw_body(json.dumps(_tensor([0] * 783 + [10**400])).encode())),
        V2Kind("data-5000-digit-int", 400, _raw_body(b'{"inputs":[{"name":"i","shape":[1,1,28,28],'
                                                     b'"datatype":"FP32","data":[' + b"9" * 5000 + b"]}]}")),
        V2Kind("json-deeply-nested", 400, _raw_body(deep)),
        V2Kind("data-deeply-nested", 400, _raw_body(b'{"inputs":[{"name":"i","shape":[1,1,28,28],'
                                                    b'"datatype":"FP32","data":' + deep + b"}]}")),
        V2Kind("unknown-output", 400, lambda: _json_body(_tensor(_pixels(), outputs=[{"name": "secrets"}]))()),
        V2Kind("body-40mb", 413, _raw_body(big_bytes)),
        V2Kind("body-40mb-chunked", 413, lambda: {"content": chunks(big_bytes()),
                                                  "headers": {"content-type": "application/json"}}),
    ]


# ----------------------------------------------------------------------------- admin reload
@dataclass(frozen=True)
class AdminKind:
    id: str
    status: int
    request: Callable[[str], Request]  # admin token -> httpx.post kwargs


def _admin(body: bytes | Callable[[], bytes], auth: str | None = "good",
           ctype: str = "application/json") -> Callable[[str], Request]:
    def req(token: str) -> Request:
        headers = {"content-type": ctype}
        if auth is not None:
            headers["authorization"] = f"Bearer {token}" if auth == "good" else auth
        return {"content": body() if callable(body) else body, "headers": headers}
    return req


def admin_corpus() -> list[AdminKind]:
    """Bodies for POST /admin/reload; the token is checked before a byte of the body is read."""
    return [
        AdminKind("no-token-40mb-body", 401, _admin(big_bytes, auth=None)),
        AdminKind("wrong-token-40mb-body", 401, _admin(big_bytes, auth="Bearer wrong-token")),
        AdminKind("basic-auth", 401, _admin(b'{"version": "1.0.0"}', auth="Basic YWRtaW46YWRtaW4=")),
        AdminKind("40mb-body", 413, _admin(big_bytes)),
        AdminKind("deeply-nested-4kb", 422, _admin(b"[" * 2000 + b"]" * 2000)),
        AdminKind("not-json", 422, _admin(b"{version: 1}")),
        AdminKind("empty-body", 422, _admin(b"")),
        AdminKind("json-array", 422, _admin(b'["1.0.0"]')),
        AdminKind("version-traversal", 422, _admin(b'{"version": "../../etc"}')),
        AdminKind("version-3000-chars", 422, _admin(b'{"version": "' + b"v" * 3000 + b'"}')),
        AdminKind("version-number", 422, _admin(b'{"version": 1}')),
        AdminKind("unknown-version", 404, _admin(b'{"version": "9.9.9"}')),
        AdminKind("unknown-model", 404, _admin(b'{"name": "no-such-model"}')),
        AdminKind("text-plain", 422, _admin(b"reload please", ctype="text/plain")),
    ]
