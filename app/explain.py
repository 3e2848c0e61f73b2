"""POST /explain: what /classify answers, plus what a person needs to see why (the page, GET /).

The same way through the service as /classify (app/classify.py `classify_upload`): the upload is
read and decoded, and `Service.classify` runs it through the runtime's micro-batcher (ONNX
Runtime, app/verdict.py's rule) and records the verdict in the metrics and the quarantine. The
answer adds the image as the model received it (after the service's own decoding and resizing),
the three most probable classes, and the label's angle statistics and rho
(threshold_deg = rho * (angle_mean_deg + angle_std_deg)). `?model=NAME` classifies with another
model of the store, its latest version (app/other_models.py): the page's model picker.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request

from app.classify import classify_upload
from app.deps import ServiceDep
from app.engine import ModelRuntime
from app.errors import model_not_found
from app.images import DecodedImage
from app.model_store import ModelNotFoundError
from app.schemas import Classification, ClassProbability, Explanation, ModelInput, error_responses
from app.service import Service
from app.uploads import multipart_body
from app.verdict import Verdicts

router = APIRouter()

TOP_CLASSES = 3
ModelName = Annotated[
    str | None,
    Query(max_length=128, pattern=r"^[a-z0-9][a-z0-9._-]*$",
          description="a model of the store (its latest version); default: the served model"),
]


@router.post(
    "/explain",
    response_model=Explanation,
    responses=error_responses(400, 404, 409, 413, 415, 422, 503),
    openapi_extra=multipart_body("file", many=False),
    summary="Classify one image and show why: the input as the model sees it, top classes, angle statistics",
)
async def explain(request: Request, svc: ServiceDep, model: ModelName = None) -> Explanation:
    """The upload as for POST /classify (multipart field `file`, or a raw `image/*` body)."""
    rt = await _runtime(svc, model)
    result, v, img = await classify_upload(request, svc, rt)
    return explanation(rt, v, result, img)


async def _runtime(svc: Service, name: str | None) -> ModelRuntime:
    try:
        return await svc.runtime_for(name)
    except ModelNotFoundError:
        raise model_not_found(str(name)) from None  # name is not None: the served model is never "not found"


def explanation(rt: ModelRuntime, v: Verdicts, result: Classification, img: DecodedImage) -> Explanation:
    """`result` (row 0 of `v`) with the top classes, the label's statistics and the model's input."""
    m = rt.model.manifest
    probabilities = v.class_probabilities[0]  # (K,)
    top = [] if result.label is None else np.argsort(-probabilities, kind="stable")[:TOP_CLASSES].tolist()
    pixels = np.rint(img.array * 255).astype(np.uint8)  # exact: the array is uint8 / 255
    return Explanation(
        **result.model_dump(),
        top_classes=[ClassProbability(label=j, class_name=m.class_names[j], probability=float(probabilities[j]))
                     for j in top],  # none when the answer is withheld (result.label is None)
        angle_mean_deg=None if result.label is None else m.angle_mean_deg[result.label],
        angle_std_deg=None if result.label is None else m.angle_std_deg[result.label],
        rho=rt.rho,
        input=ModelInput(shape=rt.input_shape, pixels=pixels.ravel().tolist(), format=img.format,
                         original_size=img.original_size),
    )
