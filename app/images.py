"""Image decoding: bytes -> float32 [C, H, W] in [0, 1], as the model expects.

Exactly:
 1. Pillow identifies the format from the bytes (never from a file name); only
    PNG, JPEG, BMP, GIF, WebP and TIFF are accepted (else 415); unidentifiable
    bytes are 400.
 2. width*height is checked against the pixel cap BEFORE any pixel is decoded
    (Image.open only reads the header) -> 413. Pillow's own decompression-bomb
    guard is also turned into 413.
 3. The first frame is used (GIF, animated WebP, multi-page TIFF).
 4. Mode: 16-bit grayscale is scaled by 1/257 to 8 bits; everything else goes
    through Pillow's `convert("L")` (C=1, ITU-R 601-2 luma, alpha ignored) or
    `convert("RGB")` (C=3, alpha ignored).
 5. If the size differs from the model's (W, H), the image is resized to exactly
    (W, H) with bilinear filtering (Pillow's antialiasing resize; aspect ratio
    NOT preserved). JPEGs are first draft-decoded at reduced scale when much larger.
 6. float32 = uint8 / 255, laid out [C, H, W].

A refused image raises `APIError` with its status (400, 413, 415). `decode_upload` is what the
routes call: small images are decoded on the event loop, large ones in a worker thread.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from app.errors import APIError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"})
# Declared types we accept (the bytes still decide): image/* of these, or a generic binary type.
ALLOWED_CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/x-png",
        "image/apng",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/gif",
        "image/webp",
        "image/tiff",
        "image/x-tiff",
    }
)
GENERIC_CONTENT_TYPES = frozenset({"", "application/octet-stream"})
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp", "TIFF": ".tiff"}
SUPPORTED = "PNG, JPEG, BMP, GIF, WebP or TIFF"  # ALLOWED_FORMATS, as the error messages name them
# Images up to this many pixels are decoded on the event loop (tens of microseconds);
# larger ones (up to the pixel cap) in a worker thread so they never stall other requests.
INLINE_DECODE_PIXELS = 256 * 256


@dataclass(frozen=True)
class DecodedImage:
    array: NDArray[np.float32]  # [C, H, W] in [0, 1]
    format: str  # Pillow format name, e.g. "PNG"
    original_size: tuple[int, int]  # (width, height) as uploaded

    @property
    def extension(self) -> str:
        """The file extension of the uploaded format (the quarantine keeps the upload under it)."""
        return EXTENSIONS.get(self.format, ".bin")


def check_content_type(content_type: str | None) -> None:
    """415 for a declared type that is neither a supported image type nor generic binary."""
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    if ct in GENERIC_CONTENT_TYPES or ct in ALLOWED_CONTENT_TYPES:
        return
    raise APIError(415, f"unsupported media type '{ct}'; send {SUPPORTED}")


def header_pixels(data: bytes) -> int | None:
    """width*height from the header only (cheap), or None if Pillow cannot even open it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return int(img.size[0] * img.size[1])
    except Exception:
        return None


async def decode_upload(data: bytes, shape: tuple[int, int, int], max_pixels: int) -> DecodedImage:
    """`decode_image`, on the event loop for an image of at most INLINE_DECODE_PIXELS, else in a thread."""
    px = header_pixels(data)
    if px is None or px <= INLINE_DECODE_PIXELS:
        return decode_image(data, shape, max_pixels)
    return await asyncio.to_thread(decode_image, data, shape, max_pixels)


def decode_image(data: bytes, shape: tuple[int, int, int], max_pixels: int) -> DecodedImage:
    """Decode `data` into the model input of one image of `shape` (C, H, W)."""
    c, h, w = shape
    if c not in (1, 3):
        raise APIError(500, f"model input has {c} channels; only 1 (grayscale) or 3 (RGB) are supported")
    if not data:
        raise APIError(400, "empty image")
    with warnings.catch_warnings():
        # Pillow's guard (Image.MAX_IMAGE_PIXELS, set to max_pixels by create_app) errors in open()
        # beyond 2x the limit; between 1x and 2x it only warns, and our explicit check below answers.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise APIError(413, f"image has too many pixels (limit {max_pixels})") from None
        except UnidentifiedImageError:
            raise APIError(400, "cannot decode image: not a recognized image format") from None
        except Exception as exc:  # malformed headers raise assorted errors
            raise APIError(400, f"cannot decode image: {type(exc).__name__}") from None
        try:
            fmt = img.format or ""
            if fmt not in ALLOWED_FORMATS:
                raise APIError(415, f"unsupported image format '{fmt or 'unknown'}'; send {SUPPORTED}")
            width, height = img.size
            if width <= 0 or height <= 0:
                raise APIError(400, "cannot decode image: zero-sized image")
            if width * height > max_pixels:
                raise APIError(
                    413, f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            if fmt == "JPEG" and (width >= 2 * w or height >= 2 * h):
                img.draft("L" if c == 1 else "RGB", (w, h))
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img.seek(0)
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise APIError(413, f"image has too many pixels (limit {max_pixels})") from None
            except Exception as exc:  # truncated / corrupt data: OSError, SyntaxError, ValueError ...
                raise APIError(400, f"cannot decode image: truncated or corrupt {fmt} data") from exc
            arr = _to_array(img, c, w, h)
        finally:
            img.close()
    return DecodedImage(arr, fmt, (width, height))


def _to_array(img: Image.Image, c: int, w: int, h: int) -> NDArray[np.float32]:
    if img.mode.startswith("I;16"):
        a16 = np.asarray(img, dtype=np.uint16)
        img = Image.fromarray((a16 // 257).astype(np.uint8), mode="L")
    target = "L" if c == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    chw = a[None, :, :] if c == 1 else a.transpose(2, 0, 1)
    out: NDArray[np.float32] = np.ascontiguousarray(chw, dtype=np.float32) / np.float32(255.0)
    return out
