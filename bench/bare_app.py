"""Ceiling for bench_service.py: the same upload parsing + decoding as /classify, no model.

`uvicorn bare_app:app --app-dir bench` (run from the repository root).
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from app.images import DecodedImage, decode_upload
from app.uploads import read_multipart

SHAPE = (1, 28, 28)
LIMIT = 32 * 1024 * 1024
MAX_PIXELS = 4096 * 4096

app = FastAPI()


async def _decode(data: bytes) -> DecodedImage:
    return await decode_upload(data, SHAPE, MAX_PIXELS)  # as the routes decode: large images in a thread


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
