"""POST /classify and POST /classify/batch: images in, a label and a verdict for each out.

One image's way, each module once: the route takes a ticket from the runtime it classifies with
(app/deps.py, app/engine.py), reads the upload (app/uploads.py), decodes it (app/images.py) and
hands it to `Service.classify` (app/service.py), which awaits the runtime's micro-batcher
(app/engine.py: the inference runtime, then app/verdict.py's rule), counts the verdicts in the metrics
and keeps each rejected input in the quarantine. The `Verdicts` it answers become the response
models (app/schemas.py). POST /explain (app/explain.py) reads and classifies as POST /classify.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from app.deps import request_id_of
from app.engine import ModelRuntime
from app.errors import APIError
from app.images import DecodedImage, decode_upload
from app.schemas import BatchClassification, Classification, error_responses
from app.service import Service, classification_dicts, classifications
from app.uploads import multipart_body, read_image, read_images
from app.verdict import Verdicts

router = APIRouter()


@router.post(
    "/classify",
    response_model=Classification,
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra=multipart_body("file", many=False),
    summary="Classify one image and say whether to trust the label",
)
async def classify(request: Request) -> Response:
    """Multipart field `file`, or a raw body with an `image/*` Content-Type."""
    # The lean path of the busiest route: no dependency injection (the service is the app's, the runtime
    # its served one: 503 while none is ready, as `ServedRuntime`), and the response encoded once from
    # the verdicts, without the response model's second validation pass (its fields and order, tested).
    svc: Service = request.app.state.service
    rt = svc.current()
    rid: str = request.scope["state"]["request_id"]
    s = svc.settings
    with rt.ticket() as ticket:
        data = await read_image(request, s.max_upload_bytes)
        img = await decode_upload(data, rt.input_shape, s.max_image_pixels)
        v = await svc.classify(rt, img.array, ticket, rid, originals=lambda _: (data, img.extension))
    return json_response(classification_dicts(rt, v, rid)[0])


async def classify_upload(request: Request, svc: Service, rt: ModelRuntime) -> tuple[Classification, Verdicts,
                                                                                   DecodedImage]:
    """The upload of POST /classify (or /explain) read, decoded and classified by `rt`."""
    rid = request_id_of(request)
    with rt.ticket() as ticket:
        data = await read_image(request, svc.settings.max_upload_bytes)
        img = await decode_upload(data, rt.input_shape, svc.settings.max_image_pixels)
        v = await svc.classify(rt, img.array, ticket, rid, originals=lambda _: (data, img.extension))
    return classifications(rt, v, rid)[0], v, img


@router.post(
    "/classify/batch",
    response_model=BatchClassification,
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra=multipart_body("files", many=True),
    summary="Classify several images (repeated multipart field `files`), results in order",
)
async def classify_batch(request: Request) -> Response:
    svc: Service = request.app.state.service
    rt = svc.current()
    s, rid = svc.settings, request_id_of(request)
    with rt.ticket() as ticket:
        datas = await read_images(request, s.max_batch_upload_bytes, s.max_batch_files)
        imgs = [await _decode_file(i, d, rt, s.max_image_pixels) for i, d in enumerate(datas)]
        v = await svc.classify(rt, np.stack([img.array for img in imgs]), ticket, rid,
                               originals=lambda i: (datas[i], imgs[i].extension), batch=True)
    return json_response({"results": classification_dicts(rt, v, rid)})


# FastAPI's JSONResponse encoding exactly (json.dumps with these options), the encoder made once.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def json_response(content: Any) -> Response:
    """`content` (plain JSON types) as the JSON response FastAPI would send for it."""
    return Response(_JSON.encode(content).encode("utf-8"), media_type="application/json")


async def _decode_file(i: int, data: bytes, rt: ModelRuntime, max_pixels: int) -> DecodedImage:
    try:
        return await decode_upload(data, rt.input_shape, max_pixels)
    except APIError as exc:
        raise exc.within(f"files[{i}]") from None

