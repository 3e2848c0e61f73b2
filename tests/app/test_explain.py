"""POST /explain (app/explain.py) and the store's other models (app/other_models.py), through
httpx.ASGITransport on the fixture store (support/fake_store.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.images import decode_image
from support.fake_store import ANGLE_MEAN, ANGLE_STD, CLASS_NAMES, NAME, angle_histogram, prototype, write_version
from support.fashion_mnist import png_bytes

pytestmark = pytest.mark.anyio

OTHER = "other-model"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _upload(img: np.ndarray, name: str = "x.png") -> dict[str, tuple[str, bytes, str]]:
    return {"file": (name, png_bytes(img), "image/png")}


async def test_explain_is_classify_plus_the_model_input_top_classes_and_statistics(make_client) -> None:
    big = np.asarray(Image.fromarray(prototype(3)).resize((56, 40), Image.Resampling.NEAREST))
    async with make_client() as c:
        plain = (await c.post("/classify", files=_upload(big))).json()
        r = await c.post("/explain", files=_upload(big))
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: v for k, v in body.items() if k in plain and k != "request_id"} == {
        k: v for k, v in plain.items() if k != "request_id"}
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["label"] == 3 and body["verdict"] == "accept"
    # the input as the model received it: the service's own decoding and resizing, times 255
    seen = decode_image(png_bytes(big), (1, 28, 28), 1 << 24)
    assert body["input"] == {"shape": [1, 28, 28], "pixels": np.rint(seen.array * 255).astype(int).ravel().tolist(),
                             "format": "PNG", "original_size": [56, 40]}
    top = body["top_classes"]
    assert len(top) == 3 and top[0]["label"] == 3 and top[0]["class_name"] == CLASS_NAMES[3]
    assert top[0]["probability"] == pytest.approx(body["probability"], abs=1e-12)
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    assert (body["angle_mean_deg"], body["angle_std_deg"], body["rho"]) == (ANGLE_MEAN, ANGLE_STD, 1.0)
    assert body["threshold_deg"] == pytest.approx(body["rho"] * (body["angle_mean_deg"] + body["angle_std_deg"]))


async def test_explain_counts_in_the_metrics_like_classify(make_client) -> None:
    async with make_client() as c:
        await c.post("/explain", files=_upload(prototype(5)))
        metrics = (await c.get("/metrics")).text
    assert f'dsphere_classifications_total{{class_name="Sandal",model="{NAME}",' \
           'verdict="accept",version="1"} 1.0' in metrics
    assert 'dsphere_requests_total{endpoint="/explain",status="200"} 1.0' in metrics


@pytest.mark.parametrize(
    ("content", "status", "detail"),
    [
        (b"not an image at all", 400, "cannot decode image: not a recognized image format"),
        (b"", 400, "empty image"),
        (b"x" * 5000, 413, "request body exceeds the limit of 4096 bytes"),
    ],
)
async def test_explain_refuses_bad_input_with_a_json_reason(make_client, content: bytes, status: int,
                                                            detail: str) -> None:
    async with make_client(max_upload_bytes=4096) as c:
        r = await c.post("/explain", content=content, headers={"content-type": "image/png"})
        again = await c.post("/explain", files=_upload(prototype(1)))
    assert (r.status_code, r.json()) == (status, {"detail": detail})
    assert again.status_code == 200 and again.json()["label"] == 1


async def test_another_model_of_the_store_is_loaded_on_first_use(make_client, store: Path) -> None:
    write_version(store, "1", name=OTHER, seed=1,
                  manifest_overrides={"angle_histogram": angle_histogram()})
    async with make_client() as c:
        served = (await c.post("/explain", files=_upload(prototype(2)))).json()
        other = await c.post(f"/explain?model={OTHER}", files=_upload(prototype(2, seed=1)))
        write_version(store, "2", name=OTHER, seed=1)  # a newer version: the next use loads it
        newer = await c.post(f"/explain?model={OTHER}", files=_upload(prototype(4, seed=1)))
        again = await c.post(f"/explain?model={NAME}", files=_upload(prototype(2)))
        readyz = (await c.get("/readyz")).json()
        loaded = c.app.state.service.other_models.loaded  # type: ignore[attr-defined]
    assert served["model"] == {"name": NAME, "version": "1"}
    assert other.status_code == 200, other.text
    assert other.json()["model"] == {"name": OTHER, "version": "1"} and other.json()["label"] == 2
    assert newer.json()["model"] == {"name": OTHER, "version": "2"} and newer.json()["label"] == 4
    assert again.json()["model"] == served["model"]
    assert readyz["model"] == served["model"]  # the served model is unchanged
    assert loaded == {OTHER: "2"}


@pytest.mark.parametrize(
    ("query", "settings", "status", "detail"),
    [
        ("model=nope", {}, 404, "model 'nope' not found"),
        ("model=Bad%20Name", {}, 422, "query.model: String should match pattern '^[a-z0-9][a-z0-9._-]*$'"),
        (f"model={OTHER}", {"other_models": 0}, 409,
         f"model '{OTHER}' is not served here: this service loads at most 0 model(s) of the store besides the "
         "one it serves (DSPHERE_OTHER_MODELS)"),
    ],
)
async def test_a_model_that_cannot_be_served_is_a_json_4xx(make_client, store: Path, query: str,
                                                           settings: dict[str, int], status: int,
                                                           detail: str) -> None:
    write_version(store, "1", name=OTHER, seed=1)
    async with make_client(**settings) as c:
        r = await c.post(f"/explain?{query}", files=_upload(prototype(2)))
    assert (r.status_code, r.json()) == (status, {"detail": detail})


async def test_model_detail_carries_the_angle_statistics_and_the_optional_histogram(make_client,
                                                                                   store: Path) -> None:
    write_version(store, "1", name=OTHER, seed=1, manifest_overrides={"angle_histogram": angle_histogram()})
    async with make_client() as c:
        served = (await c.get(f"/models/{NAME}")).json()["manifest"]
        other = (await c.get(f"/models/{OTHER}")).json()["manifest"]
    assert served["angle_histogram"] is None  # an older manifest: still served
    assert served["angle_mean_deg"] == [ANGLE_MEAN] * 10 and served["angle_std_deg"] == [ANGLE_STD] * 10
    assert other["angle_histogram"] == angle_histogram()
