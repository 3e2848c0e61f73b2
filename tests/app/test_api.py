"""HTTP API through httpx.ASGITransport, lifespan run (model loaded + warmed)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from support.fake_store import CLASS_NAMES, NAME, prototype, write_version
from support.fashion_mnist import png_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _img_bytes(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


CLASSIFY_KEYS = {"label", "class_name", "probability", "angle_deg", "threshold_deg", "verdict", "reason", "model",
                 "request_id"}


async def test_classify_multipart_accepts_prototype(make_client) -> None:
    async with make_client() as c:
        r = await c.post("/classify", files={"file": ("x.png", png_bytes(prototype(3)), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == CLASSIFY_KEYS
    assert body["label"] == 3 and body["class_name"] == CLASS_NAMES[3]
    assert body["verdict"] == "accept"
    assert body["angle_deg"] < body["threshold_deg"] == pytest.approx(15.0)
    assert 0 < body["probability"] <= 1
    assert body["model"] == {"name": NAME, "version": "1"}
    assert body["request_id"] == r.headers["x-request-id"]


async def test_classify_raw_body_and_request_id(make_client) -> None:
    async with make_client() as c:
        r = await c.post(
            "/classify", content=png_bytes(prototype(7)), headers={"content-type": "image/png", "x-request-id": "abc-1"}
        )
    assert r.status_code == 200, r.text
    assert r.json()["label"] == 7 and r.json()["request_id"] == "abc-1"


async def test_noise_is_rejected_with_200(make_client) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    async with make_client() as c:
        r = await c.post("/classify", files={"file": ("n.png", png_bytes(noise), "image/png")})
    assert r.status_code == 200
    assert r.json()["verdict"] == "reject"
    assert r.json()["angle_deg"] > r.json()["threshold_deg"]


@pytest.mark.parametrize(
    "fmt,kw,ctype",
    [
        ("PNG", {}, "image/png"),
        ("JPEG", {"quality": 100}, "image/jpeg"),
        ("BMP", {}, "image/bmp"),
        ("GIF", {}, "image/gif"),
        ("WEBP", {"lossless": True}, "image/webp"),
        ("TIFF", {}, "image/tiff"),
    ],
)
async def test_formats(make_client, fmt, kw, ctype) -> None:
    async with make_client() as c:
        r = await c.post("/classify", files={"file": ("x", _img_bytes(prototype(5), fmt, **kw), ctype)})
    assert r.status_code == 200, r.text
    assert r.json()["label"] == 5


async def test_rgb_and_resize(make_client) -> None:
    """An RGB image of another size is converted to L and resized to 28x28."""
    big = Image.fromarray(prototype(1)).resize((56, 56), Image.Resampling.NEAREST).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    async with make_client() as c:
        r = await c.post("/classify", files={"file": ("x.png", buf.getvalue(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert r.json()["label"] == 1


async def test_batch_in_order(make_client) -> None:
    order = [4, 0, 9, 2, 2]
    files = [("files", (f"{i}.png", png_bytes(prototype(k)), "image/png")) for i, k in enumerate(order)]
    async with make_client(batch_size=2) as c:
        r = await c.post("/classify/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["label"] for x in results] == order
    assert all(set(x) == CLASSIFY_KEYS for x in results)


# ---------------------------------------------------------------- errors


async def test_truncated_image_400(make_client) -> None:
    data = png_bytes(prototype(0))
    async with make_client() as c:
        r = await c.post("/classify", files={"file": ("x.png", data[: len(data) // 2], "image/png")})
    assert r.status_code == 400
    assert r.json() == {"detail": "cannot decode image: truncated or corrupt PNG data"}


async def test_garbage_400(make_client) -> None:
    async with make_client() as c:
        r = await c.post("/classify", content=b"definitely not an image", headers={"content-type": "image/png"})
    assert r.status_code == 400
    assert r.json() == {"detail": "cannot decode image: not a recognized image format"}


async def test_empty_400(make_client) -> None:
    async with make_client() as c:
        r = await c.post("/classify", content=b"", headers={"content-type": "image/png"})
    assert r.status_code == 400
    assert r.json() == {"detail": "empty image"}


async def test_unsupported_content_type_415(make_client) -> None:
    async with make_client() as c:
        r = await c.post("/classify", content=b"{}", headers={"content-type": "application/json"})
        r2 = await c.post("/classify", files={"file": ("x.svg", b"<svg/>", "image/svg+xml")})
        r3 = await c.post("/classify", files={"file": ("x.ico", _img_bytes(prototype(0), "ICO"), "image/png")})
    assert r.status_code == 415
    assert r.json() == {
        "detail": "unsupported content type 'application/json'; send multipart/form-data with a 'file' field "
        "or a raw body with an image/* content type (PNG, JPEG, BMP, GIF, WebP or TIFF)"
    }
    assert r2.status_code == 415
    assert r2.json() == {"detail": "unsupported media type 'image/svg+xml'; send PNG, JPEG, BMP, GIF, WebP or TIFF"}
    assert r3.status_code == 415
    assert r3.json() == {"detail": "unsupported image format 'ICO'; send PNG, JPEG, BMP, GIF, WebP or TIFF"}


async def test_missing_field_422(make_client) -> None:
    async with make_client() as c:
        r = await c.post("/classify", files={"image": ("x.png", png_bytes(prototype(0)), "image/png")})
        r2 = await c.post("/classify/batch", files={"file": ("x.png", png_bytes(prototype(0)), "image/png")})
    assert r.status_code == 422
    assert r.json() == {"detail": "missing multipart field 'file'"}
    assert r2.status_code == 422
    assert r2.json() == {"detail": "missing multipart field 'files'"}


async def test_too_many_bytes_413_streamed_without_content_length(make_client) -> None:
    """The cap holds while streaming: a chunked body with no Content-Length."""
    chunks_sent = 0

    async def body():
        nonlocal chunks_sent
        for _ in range(100):
            chunks_sent += 1
            yield b"\0" * 1024

    async with make_client(max_upload_bytes=8 * 1024) as c:
        r = await c.post("/classify", content=body(), headers={"content-type": "image/png"})
        r2 = await c.post("/classify", files={"file": ("x.png", b"\0" * 20000, "image/png")})
        r3 = await c.get("/healthz")
    too_large = {"detail": f"request body exceeds the limit of {8 * 1024} bytes"}
    assert (r.status_code, r.json()) == (413, too_large)
    assert chunks_sent == 9  # reading stopped at the first chunk past the cap, not at the body's end
    assert (r2.status_code, r2.json()) == (413, too_large)  # refused on its Content-Length
    assert r3.status_code == 200


async def test_lying_content_length_413(make_client) -> None:
    """A Content-Length smaller than the body does not get past the cap: the bytes received are
    counted, and reading stops at the first chunk past the cap; the next request is served."""
    chunks_sent = 0

    async def body():
        nonlocal chunks_sent
        for _ in range(20):
            chunks_sent += 1
            yield b"\0" * 1024

    async with make_client(max_upload_bytes=8 * 1024) as c:
        req = c.build_request("POST", "/classify", content=body(), headers={"content-type": "image/png"})
        req.headers["content-length"] = "100"
        r = await c.send(req)
        after = await c.post("/classify", content=png_bytes(prototype(2)), headers={"content-type": "image/png"})
    assert (r.status_code, r.json()) == (413, {"detail": f"request body exceeds the limit of {8 * 1024} bytes"})
    assert chunks_sent == 9  # 9 KiB read of the 20 KiB sent
    assert after.status_code == 200 and after.json()["label"] == 2


async def test_too_many_pixels_413_before_decoding(make_client) -> None:
    # 5000x5000 black PNG: tiny file, 25 Mpx. Limit 1 Mpx.
    data = _img_bytes(np.zeros((5000, 5000), np.uint8), "PNG")
    assert len(data) < 100_000
    async with make_client(max_image_pixels=20_000_000) as c:
        r = await c.post("/classify", files={"file": ("bomb.png", data, "image/png")})
    assert r.status_code == 413
    assert r.json() == {"detail": "image is 5000x5000 = 25000000 pixels, over the limit of 20000000"}
    # beyond twice the limit Pillow's own guard refuses it already in Image.open
    async with make_client(max_image_pixels=1_000_000) as c:
        r = await c.post("/classify", files={"file": ("bomb.png", data, "image/png")})
        r2 = await c.get("/healthz")
    assert r.status_code == 413
    assert r.json() == {"detail": "image has too many pixels (limit 1000000)"}
    assert r2.status_code == 200


async def test_batch_too_many_files_413(make_client) -> None:
    files = [("files", (f"{i}.png", png_bytes(prototype(0)), "image/png")) for i in range(5)]
    async with make_client(max_batch_files=4) as c:
        r = await c.post("/classify/batch", files=files)
    assert r.status_code == 413
    assert r.json() == {"detail": "too many files: 5 (limit 4)"}


async def test_batch_bad_file_named(make_client) -> None:
    files = [
        ("files", ("0.png", png_bytes(prototype(0)), "image/png")),
        ("files", ("1.png", b"garbage", "image/png")),
    ]
    async with make_client() as c:
        r = await c.post("/classify/batch", files=files)
    assert r.status_code == 400
    assert r.json() == {"detail": "files[1]: cannot decode image: not a recognized image format"}


async def test_malformed_multipart_400(make_client) -> None:
    async with make_client() as c:
        r = await c.post("/classify", content=b"--x\r\nbad", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400
    assert r.json() == {"detail": "malformed multipart body: missing boundary"}


async def test_unknown_route_json_404(make_client) -> None:
    async with make_client() as c:
        r = await c.get("/nope")
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found"}


# ---------------------------------------------------------------- health, models, docs


async def test_health_and_ready(make_client) -> None:
    async with make_client() as c:
        health = (await c.get("/healthz")).json()
        r = await c.get("/readyz")
    assert health["status"] == "ok" and health["model"] == {"name": NAME, "version": "1"}
    runtime = health["runtime"]
    assert (runtime["backend"], runtime["precision"], runtime["fallback"]) == ("onnxruntime", "fp32", None)
    assert (runtime["requested_backend"], runtime["requested_precision"]) == ("onnxruntime", "fp32")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "model": {"name": NAME, "version": "1"}}


async def test_not_ready_503(make_client, tmp_path) -> None:
    async with make_client(model_store=tmp_path / "empty") as c:
        r = await c.get("/readyz")
        r2 = await c.post("/classify", content=png_bytes(prototype(0)), headers={"content-type": "image/png"})
        r3 = await c.get("/healthz")
    missing = tmp_path / "empty"
    assert r.status_code == 503
    assert r.json() == {"detail": f"model not ready: model store {missing} does not exist or is not a directory"}
    assert r2.status_code == 503 and r2.headers["retry-after"] == "5"
    assert r3.status_code == 200


async def test_models(make_client, store) -> None:
    write_version(store, "2")
    write_version(store, "10")
    async with make_client(model_version="2") as c:
        r = await c.get("/models")
        r2 = await c.get(f"/models/{NAME}")
        r3 = await c.get("/models/nope")
    assert r.json() == {
        "models": [
            {"name": NAME, "versions": ["1", "2", "10"], "latest": "10", "served_version": "2"}
        ]
    }
    d = r2.json()
    assert d["versions"] == ["1", "2", "10"] and d["served_version"] == "2"
    assert d["manifest"]["version"] == "2" and d["manifest"]["rho"] == 1.0 and d["manifest"]["manifest_rho"] == 1.0
    assert d["manifest"]["metrics"]["clean_accuracy"] == 0.9
    assert d["provider"] == "CPUExecutionProvider"
    assert r3.status_code == 404 and r3.json() == {"detail": "model 'nope' not found"}


async def test_rho_override(make_client) -> None:
    async with make_client(rho=0.1) as c:  # threshold 1.5 deg: even prototypes are rejected
        r = await c.post("/classify", content=png_bytes(prototype(0)), headers={"content-type": "image/png"})
        d = (await c.get(f"/models/{NAME}")).json()
    assert r.json()["verdict"] == "reject" and r.json()["threshold_deg"] == pytest.approx(1.5)
    assert d["manifest"]["rho"] == 0.1 and d["manifest"]["manifest_rho"] == 1.0


async def test_openapi_documents_errors(make_client) -> None:
    async with make_client() as c:
        spec = (await c.get("/openapi.json")).json()
        docs = await c.get("/docs")
    assert docs.status_code == 200
    op = spec["paths"]["/classify"]["post"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(op["responses"])
    assert op["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert "Classification" in spec["components"]["schemas"]
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert "V2InferRequest" in spec["components"]["schemas"]
    json.dumps(spec)


async def test_queue_full_503_with_retry_after(make_client) -> None:
    import asyncio

    async with make_client(queue_size=1, batch_delay_ms=1000) as c:
        rt = c.app.state.service.runtime  # type: ignore[attr-defined]
        hold = rt.ticket()  # keeps the worker waiting to fill the batch
        first = asyncio.ensure_future(
            c.post("/classify", content=png_bytes(prototype(0)), headers={"content-type": "image/png"})
        )
        while rt.batcher.depth < 1:
            await asyncio.sleep(0.001)
        r = await c.post("/classify", content=png_bytes(prototype(1)), headers={"content-type": "image/png"})
        hold.close()
        assert (await first).status_code == 200
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json() == {"detail": "inference queue is full (1 waiting requests); retry shortly"}


async def test_unexpected_error_is_json_500(make_client, monkeypatch) -> None:
    import httpx

    import app.classify

    def boom(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(app.classify, "classification_dicts", boom)
    async with make_client() as c:
        transport = httpx.ASGITransport(app=c.app, raise_app_exceptions=False)  # type: ignore[attr-defined]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c2:
            r = await c2.post("/classify", content=png_bytes(prototype(0)), headers={"content-type": "image/png"})
            ok = await c2.get("/healthz")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error"}
    assert ok.status_code == 200


async def test_model_detail_shows_the_strong_evaluation(make_client, store) -> None:
    """A version published with --evaluation carries its worst case; GET /models/{name} shows it."""
    from support.fake_store import manifest_dict

    metrics = manifest_dict("3", "0" * 64)["metrics"]
    strong = {"worst_case_robust_accuracy": 0.61, "worst_case_defended_rate": 0.7,
              "adaptive_defended_rate": 0.74, "worst_case_attacks": ["fgsm", "pgd-100", "adaptive"],
              "worst_case_n_examples": 1000}
    write_version(store, "3", manifest_overrides={"metrics": {**metrics, **strong}})
    async with make_client() as c:
        d = (await c.get(f"/models/{NAME}")).json()
    assert d["served_version"] == "3"
    assert {k: d["manifest"]["metrics"][k] for k in strong} == strong


async def test_an_unknown_query_parameter_is_a_400_on_every_route(make_client) -> None:
    """/classify takes no `model` (only the page's /explain does): a client that sends one learns
    it, instead of getting the served model's answer silently."""
    png = png_bytes(prototype(3))
    async with make_client() as c:
        r = await c.post("/classify?model=other", files={"file": ("x.png", png, "image/png")})
        batch = await c.post("/classify/batch?x=1", files=[("files", ("x.png", png, "image/png"))])
        health = await c.get("/healthz?verbose=1")
        explain = await c.post(f"/explain?model={NAME}", files={"file": ("x.png", png, "image/png")})
        plain = await c.get("/healthz")
    assert r.status_code == 400 and r.json()["detail"] == (
        "unknown query parameter(s) model; this route takes no query parameters")
    assert batch.status_code == 400 and "x" in batch.json()["detail"]
    assert health.status_code == 400
    assert explain.status_code == 200 and plain.status_code == 200
