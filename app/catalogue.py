"""The model catalogue: GET /models (the store's models and versions, and which one is served)
and GET /models/{name} (one model, with the manifest summary of its served or latest version:
rho, calibration, metrics, angle statistics). The page's model picker reads both."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServiceDep
from app.engine import ModelRuntime
from app.errors import model_not_found
from app.manifest import MANIFEST_FILE, Manifest
from app.model_store import ModelStoreError, find_version, list_models, list_versions, read_manifest
from app.schemas import ManifestSummary, ModelDetail, ModelList, ModelSummary, error_responses
from app.service import NotReadyError, Service

router = APIRouter()


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
async def model_detail(svc: ServiceDep, name: str) -> ModelDetail:
    summary = _summary(svc, name)
    rt = _served(svc)
    served = rt is not None and rt.name == name
    if not summary.versions and not served:
        raise model_not_found(name)
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
