"""REST endpoints: /classify, /classify/batch, health, models, metrics.

One image's way through /classify, each module once: the route takes a ticket from the served
runtime (app/deps.py, app/engine.py), reads the upload (app/uploads.py), decodes it
(app/images.py), and awaits `ModelRuntime.classify` (app/engine.py: micro-batcher, ONNX Runtime,
then app/verdict.py's rule). The `Verdicts` it answers goes, as it is, to the response models
(app/schemas.py), the metrics (app/metrics.py) and the quarantine of rejected inputs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app import images
from app.deps import ServedRuntime, ServiceDep
from app.engine import ModelRuntime
from app.errors import APIError
from app.images import EXTENSIONS, DecodedImage, check_content_type
from app.manifest import MANIFEST_FILE, Manifest
from app.metrics import CONTENT_TYPE
from app.model_store import ModelStoreError, find_version, list_models, list_versions, read_manifest
from app.schemas import (
    BatchClassification,
    Classification,
    Health,
    ManifestSummary,
    ModelDetail,
    ModelList,
    ModelRef,
    ModelSummary,
    Ready,
    error_responses,
)
from app.service import NotReadyError, Service
from app.settings import Settings
from app.uploads import Part, media_type, read_body, read_multipart
from app.verdict import Verdicts

log = logging.getLogger("dsphere.api")
router = APIRouter()

_IMAGE_TYPES = "PNG, JPEG, BMP, GIF, WebP or TIFF"


def request_id_of(request: Request) -> str:
    rid: str = request.state.request_id
    return rid


def multipart_body(name: str, many: bool) -> dict[str, Any]:
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


async def decode_upload(data: bytes, rt: ModelRuntime, max_pixels: int, where: str = "") -> DecodedImage:
    try:
        return await images.decode_upload(data, rt.input_shape, max_pixels)
    except APIError as exc:
        if where:
            raise exc.within(where) from None
        raise


DecodedUpload = tuple[bytes, DecodedImage]  # an upload's bytes (kept for the quarantine) and its pixels


def _file_parts(parts: list[Part], field: str) -> list[Part]:
    return [p for p in parts if p.name == field]


def classifications(rt: ModelRuntime, v: Verdicts, request_id: str) -> list[Classification]:
    """The response model of each row of `v`."""
    names = rt.model.manifest.class_names
    ref = ModelRef(name=rt.name, version=rt.version)
    return [
        Classification(
            label=label,
            class_name=names[label],
            probability=probability,
            angle_deg=angle,
            threshold_deg=threshold,
            verdict=verdict,
            model=ref,
            request_id=request_id,
        )
        for label, probability, angle, threshold, verdict in zip(
            v.labels.tolist(), v.probabilities.tolist(), v.angles_deg.tolist(), v.thresholds_deg.tolist(),
            v.names(), strict=True,
        )
    ]


async def record_verdicts(svc: Service, rt: ModelRuntime, v: Verdicts, results: list[Classification],
                  uploads: list[DecodedUpload], batch: bool) -> None:
    """Count the verdicts in the metrics; keep each rejected upload (and its result) in the quarantine."""
    svc.metrics.observe_verdicts(rt.name, rt.version, rt.model.manifest.class_names, v)
    q = svc.quarantine
    if q is None:
        return
    for i in np.flatnonzero(~v.accepted).tolist():
        data, img = uploads[i]
        record = {**results[i].model_dump(), "index": i if batch else None}
        await asyncio.to_thread(q.add, data, EXTENSIONS.get(img.format, ".bin"), record)


@router.post(
    "/classify",
    response_model=Classification,
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra=multipart_body("file", many=False),
    summary="Classify one image and say whether to trust the label",
)
async def classify(request: Request, svc: ServiceDep, rt: ServedRuntime) -> Classification:
    """Multipart field `file`, or a raw body with an `image/*` Content-Type."""
    with rt.ticket() as ticket:
        data = await read_single_upload(request, svc.settings)
        img = await decode_upload(data, rt, svc.settings.max_image_pixels)
        v = await rt.classify(img.array, ticket)
    results = classifications(rt, v, request_id_of(request))
    await record_verdicts(svc, rt, v, results, [(data, img)], batch=False)
    return results[0]


async def read_single_upload(request: Request, settings: Settings) -> bytes:
    limit = settings.max_upload_bytes
    mt = media_type(request)
    if mt == "multipart/form-data":
        files = _file_parts(await read_multipart(request, limit), "file")
        if not files:
            raise APIError(422, "missing multipart field 'file'")
        if len(files) > 1:
            raise APIError(422, f"expected one multipart field 'file', got {len(files)}; use /classify/batch")
        check_content_type(files[0].content_type)
        data = bytes(files[0].data)
    elif mt.startswith("image/"):
        check_content_type(mt)
        data = await read_body(request, limit)
    else:
        raise APIError(
            415,
            f"unsupported content type '{mt}'; send multipart/form-data with a 'file' field "
            f"or a raw body with an image/* content type ({_IMAGE_TYPES})",
        )
    return data


@router.post(
    "/classify/batch",
    response_model=BatchClassification,
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra=multipart_body("files", many=True),
    summary="Classify several images (repeated multipart field `files`), results in order",
)
async def classify_batch(request: Request, svc: ServiceDep, rt: ServedRuntime) -> BatchClassification:
    with rt.ticket() as ticket:
        uploads = await _read_batch(request, svc.settings, rt)
        v = await rt.classify(np.stack([img.array for _, img in uploads]), ticket)
    results = classifications(rt, v, request_id_of(request))
    await record_verdicts(svc, rt, v, results, uploads, batch=True)
    return BatchClassification(results=results)


async def _read_batch(request: Request, s: Settings, rt: ModelRuntime) -> list[DecodedUpload]:
    mt = media_type(request)
    if mt != "multipart/form-data":
        raise APIError(415, f"unsupported content type '{mt}'; send multipart/form-data with 'files' fields")
    files = _file_parts(await read_multipart(request, s.max_batch_upload_bytes), "files")
    if not files:
        raise APIError(422, "missing multipart field 'files'")
    if len(files) > s.max_batch_files:
        raise APIError(413, f"too many files: {len(files)} (limit {s.max_batch_files})")
    for i, f in enumerate(files):
        try:
            check_content_type(f.content_type)
        except APIError as exc:
            raise exc.within(f"files[{i}]") from None
    datas = [bytes(f.data) for f in files]
    return [(d, await decode_upload(d, rt, s.max_image_pixels, f"files[{i}]")) for i, d in enumerate(datas)]


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses=error_responses(503), summary="Model loaded and warmed")
async def readyz(rt: ServedRuntime) -> Ready:
    return Ready(status="ready", model=ModelRef(name=rt.name, version=rt.version))


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)")
async def metrics(svc: ServiceDep) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE)


def _served(svc: Service) -> ModelRuntime | None:
    try:
        return svc.current()
    except NotReadyError:
        return None


def _summary(svc: Service, name: str) -> ModelSummary:
    store = svc.settings.model_store
    rt = _served(svc)
    try:
        latest: str | None = find_version(store, name, "latest")
    except ModelStoreError:
        latest = None
    return ModelSummary(
        name=name,
        versions=list_versions(store, name),
        latest=latest,
        served_version=rt.version if rt is not None and rt.name == name else None,
    )


def _manifest_summary(m: Manifest, rho: float) -> ManifestSummary:
    return ManifestSummary(
        version=m.version,
        created_at=m.created_at,
        sha256=m.sha256,
        class_names=m.class_names,
        input_shape=m.input.shape,
        rho=rho,
        manifest_rho=m.rho,
        calibration=m.calibration,
        metrics=m.metrics,
        angle_mean_deg=m.angle_mean_deg,
        angle_std_deg=m.angle_std_deg,
        angle_histogram=m.angle_histogram,
    )


@router.get("/models", response_model=ModelList, summary="Models and versions in the store")
async def models(svc: ServiceDep) -> ModelList:
    names = set(list_models(svc.settings.model_store))
    rt = _served(svc)
    if rt is not None:
        names.add(rt.name)
    return ModelList(models=[_summary(svc, n) for n in sorted(names)])


@router.get(
    "/models/{name}",
    response_model=ModelDetail,
    responses=error_responses(404),
    summary="One model: versions, manifest summary (rho, calibration, metrics)",
)
async def model_detail(svc: ServiceDep, name: str) -> ModelDetail | JSONResponse:
    summary = _summary(svc, name)
    rt = _served(svc)
    served = rt is not None and rt.name == name
    if not summary.versions and not served:
        raise APIError(404, f"model '{name}' not found")
    manifest: ManifestSummary | None = None
    error: str | None = None
    provider: str | None = None
    if rt is not None and served:
        manifest = _manifest_summary(rt.model.manifest, rt.rho)
        provider = rt.model.provider
    elif summary.latest is not None:
        try:
            m = read_manifest(svc.settings.model_store / name / summary.latest / MANIFEST_FILE)
            rho = svc.settings.rho if svc.settings.rho is not None else m.rho
            manifest = _manifest_summary(m, rho)
        except ModelStoreError as exc:
            error = str(exc)
    return ModelDetail(**summary.model_dump(), manifest=manifest, manifest_error=error, provider=provider)
