"""Ceiling for bench_service.py: the same upload parsing + decoding as /classify, no model.

`uvicorn bare_app:app --app-dir bench` (run from the repository root).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request

from app.images import DecodedImage, decode_image, header_pixels
from app.uploads import read_multipart

SHAPE = (1, 28, 28)
LIMIT = 32 * 1024 * 1024
MAX_PIXELS = 4096 * 4096

app = FastAPI()


async def _decode(data: bytes) -> DecodedImage:
    # same policy as app/api.py: small images on the loop, large ones in a thread
    px = header_pixels(data)
    if px is None or px <= 256 * 256:
        return decode_image(data, SHAPE, MAX_PIXELS)
    return await asyncio.to_thread(decode_image, data, SHAPE, MAX_PIXELS)


@app.post("/decode")
async def decode(request: Request) -> dict[str, float]:
    parts = [p for p in await read_multipart(request, LIMIT) if p.name == "file"]
    img = await _decode(bytes(parts[0].data))
    return {"mean": float(img.array.mean())}


@app.post("/decode/batch")
async def decode_batch(request: Request) -> dict[str, list[float]]:
    parts = [p for p in await read_multipart(request, LIMIT) if p.name == "files"]
    imgs = [await _decode(bytes(p.data)) for p in parts]
    return {"means": [float(i.array.mean()) for i in imgs]}
