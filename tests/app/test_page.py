"""The page (GET /), /docs and /redoc in a real browser: Debian's Chromium driven by Playwright
(support/browser.py) against a real `uvicorn app.main:app` on loopback (support/server.py).

The store served is the bundled one (fashion-mnist-baseline by default, the D-SphereNet beside
it) plus a fixture model whose manifest carries an angle histogram. Every test checks that the
browser asked nothing of any origin but the service's. Skipped where no browser can be
launched, failed instead with DSPHERE_REQUIRE_BROWSER=1 (.ci/run sets it).

DSPHERE_SCREENSHOT_DIR=docs/images pytest tests/app/test_page.py also saves the README's
screenshots (page-accepted.png, page-rejected.png).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from app.images import decode_image
from app.manifest import MANIFEST_FILE, MODEL_FILE
from app.model_store import find_version, read_manifest
from app.verdict import geodesic_verdict
from support.browser import browser_unusable, launch_chromium
from support.bundled import BUNDLED_STORE, MODEL_NAME, bundled_version
from support.fake_store import angle_histogram, write_version
from support.fashion_mnist import load_fashion_mnist_test, load_fashion_mnist_test_labels, png_bytes
from support.query_streams import square_queries
from support.server import ServerHandle, start_server

OTHER = next(n for n in ("fashion-mnist-dsphere", "fashion-mnist-baseline") if n != MODEL_NAME)  # not the default
FIXTURE = "fixture-with-histogram"
MAX_UPLOAD_BYTES = 1 << 20
TIMEOUT_MS = 20_000
SCREENSHOTS = os.environ.get("DSPHERE_SCREENSHOT_DIR")


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("DSPHERE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"DSPHERE_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = browser_unusable()
    if reason:
        _skip_or_fail(reason)
    with launch_chromium() as b:
        yield b


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled store's models (linked, untouched) and a fixture model with an angle histogram."""
    root = tmp_path_factory.mktemp("page-store")
    for model in BUNDLED_STORE.iterdir():
        if model.is_dir():
            (root / model.name).symlink_to(model, target_is_directory=True)
    write_version(root, "1", name=FIXTURE, manifest_overrides={"angle_histogram": angle_histogram()})
    return root


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    log = tmp_path_factory.mktemp("page-server") / "server.log"
    env = {"DSPHERE_MODEL_STORE": str(store), "DSPHERE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES)}
    with start_server(env, log_path=log) as srv:
        yield srv
    assert "Traceback" not in srv.log_text(), srv.log_tail()


@dataclass
class Visit:
    """One browser context on the service: its page, and every request and error it saw."""

    page: Any
    origin: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_only_own_origin(self) -> None:
        own = (self.origin + "/", f"blob:{self.origin}/")
        assert self.requests, "no request was logged"
        assert [u for u in self.requests if not u.startswith(own)] == []
        assert self.errors == []


@pytest.fixture
def visit(browser: Any, server: ServerHandle) -> Iterator[Visit]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    v = Visit(page, server.url)
    page.on("request", lambda req: v.requests.append(req.url))
    page.on("pageerror", lambda exc: v.errors.append(f"page error: {exc}"))
    # the browser's own line for each 4xx answer ("Failed to load resource") is expected here
    page.on("console", lambda msg: v.errors.append(f"console: {msg.text}")
            if msg.type == "error" and "Failed to load resource" not in msg.text else None)
    # nothing may leave for another origin: refused here, and still in the request log
    context.route(re.compile(r"^(?!" + re.escape(server.url) + r"/)(?!blob:)"), lambda route: route.abort())
    page.goto(server.url + "/")
    page.wait_for_selector("#model:not([disabled])")
    yield v
    context.close()


def _reference(name: str, images: list[bytes]) -> tuple[Any, list[str]]:
    """The served version's verdicts on `images` (decoded as the service decodes them), by ONNX
    Runtime and the verdict rule directly: what the page must show."""
    version = find_version(BUNDLED_STORE, name)
    vdir = BUNDLED_STORE / name / version
    m = read_manifest(vdir / MANIFEST_FILE)
    x = np.stack([decode_image(b, m.input.shape, 1 << 24).array for b in images])
    sess = ort.InferenceSession(str(vdir / MODEL_FILE), providers=["CPUExecutionProvider"])
    logits, cosines = sess.run(["logits", "cosines"], {sess.get_inputs()[0].name: x})
    return geodesic_verdict(logits, cosines, m.angle_mean_deg, m.angle_std_deg, m.rho), m.class_names


def _upscaled(img: np.ndarray, side: int = 84) -> bytes:
    return png_bytes(np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BILINEAR)))


def _pick(v: Visit, name: str, data: bytes, mime: str = "image/png") -> None:
    v.page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


def _verdict(v: Visit) -> dict[str, str]:
    v.page.wait_for_function("() => !document.getElementById('status').textContent")
    v.page.wait_for_selector("#verdict[data-verdict]")
    return v.page.evaluate("""() => ({
        verdict: document.getElementById('verdict').dataset.verdict,
        word: document.getElementById('verdict-word').textContent,
        text: document.getElementById('verdict-text').textContent,
        reason: document.getElementById('reason').textContent,
        top: document.querySelector('#top-classes li').textContent,
    })""")


def _model_input(v: Visit) -> np.ndarray:
    """The page's drawing of the model's input, pixel for pixel (red channel)."""
    rgba = v.page.evaluate("""() => {
        const c = document.getElementById('model-input');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
    }""")
    return np.asarray(rgba, np.uint8).reshape(-1, 4)[:, 0]


def _screenshot(v: Visit, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        v.page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def test_a_fashion_mnist_png_shows_its_class_accept_and_what_the_model_sees(visit: Visit) -> None:
    images = load_fashion_mnist_test(40)
    uploads = [_upscaled(a) for a in images]
    ref, names = _reference(MODEL_NAME, uploads)
    labels = load_fashion_mnist_test_labels(40)
    i = next(k for k in range(len(uploads)) if ref.accepted[k] and ref.labels[k] == labels[k])
    _pick(visit, f"test-{i}.png", uploads[i])
    shown = _verdict(visit)
    cls = names[int(ref.labels[i])]
    assert (shown["verdict"], shown["word"]) == ("accept", "accept")
    assert shown["text"].startswith(f"{cls} (") and "trusts this label" in shown["text"]
    assert shown["top"].startswith(cls)
    assert f"angle {ref.angles_deg[i]:.1f}° ≤ threshold {ref.thresholds_deg[i]:.1f}°" in shown["reason"]
    # the model's input as the page draws it: the upload decoded and resized to 28x28 by the service
    seen = decode_image(uploads[i], (1, 28, 28), 1 << 24).array
    np.testing.assert_array_equal(_model_input(visit), np.rint(seen * 255).astype(np.uint8).ravel())
    assert "84×84 PNG" in visit.page.text_content("#original-caption")
    # the histogram of the served version's manifest drawn, or a note where the manifest predates it
    served = json.loads((BUNDLED_STORE / MODEL_NAME / bundled_version() / "manifest.json").read_text())
    has_histogram = served.get("angle_histogram") is not None
    assert visit.page.is_visible("#histogram-note") == (not has_histogram)
    if has_histogram:
        assert visit.page.locator("#angle-chart rect.bin").count() >= 5
    _screenshot(visit, "page-accepted.png")
    visit.assert_only_own_origin()


@pytest.mark.parametrize(("button", "example"), [("Noise", "noise.png"), ("Blank image", "blank.png")])
def test_noise_and_a_blank_image_show_reject_with_the_reason(visit: Visit, button: str, example: str) -> None:
    data = (Path(__file__).resolve().parents[2] / "app" / "static" / "examples" / example).read_bytes()
    ref, names = _reference(MODEL_NAME, [data])
    assert not ref.accepted[0], f"the served model accepts the bundled {example}"
    visit.page.get_by_role("button", name=button, exact=True).click()
    shown = _verdict(visit)
    cls = names[int(ref.labels[0])]
    assert (shown["verdict"], shown["word"]) == ("reject", "reject")
    assert f"best guess is {cls}" in shown["text"] and "does not trust this label" in shown["text"]
    assert f"angle {ref.angles_deg[0]:.1f}° > threshold {ref.thresholds_deg[0]:.1f}°" in shown["reason"]
    # drawn: this image's angle to the right of (beyond) its class's threshold
    xs = visit.page.evaluate("""() => ['threshold', 'angle'].map(
        c => Number(document.querySelector('#angle-chart line.' + c).getAttribute('x1')))""")
    assert xs[1] > xs[0]
    if example == "noise.png":
        _screenshot(visit, "page-rejected.png")
    visit.assert_only_own_origin()


def _solid_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bad_files_show_the_services_error_and_the_page_keeps_working(visit: Visit) -> None:
    bad = [
        ("notes.txt", b"just some text, not an image", "text/plain",
         "(415): unsupported media type 'text/plain'; send PNG, JPEG, BMP, GIF, WebP or TIFF"),
        ("photo.png", b"just some text, not an image", "image/png",
         "(400): cannot decode image: not a recognized image format"),
        ("huge.png", _solid_png(5000), "image/png",
         "(413): image is 5000x5000 = 25000000 pixels, over the limit of 16777216"),
        ("big.bin", os.urandom(MAX_UPLOAD_BYTES + 1), "application/octet-stream",
         f"(413): request body exceeds the limit of {MAX_UPLOAD_BYTES} bytes"),
    ]
    for name, data, mime, message in bad:
        _pick(visit, name, data, mime)
        visit.page.wait_for_selector("#error:not([hidden])")
        assert message in visit.page.text_content("#error")
        assert visit.page.is_hidden("#result")
        # and the page goes on: an example right after is classified
        visit.page.get_by_role("button", name="Trouser").click()
        assert _verdict(visit)["top"].startswith("Trouser")
        assert visit.page.is_hidden("#error")
    visit.assert_only_own_origin()


def test_choosing_a_model_shows_its_figures_and_classifies_with_it(visit: Visit, server: ServerHandle) -> None:
    page = visit.page
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == sorted([p.name for p in BUNDLED_STORE.iterdir() if p.is_dir()] + [FIXTURE])
    assert page.input_value("#model") == MODEL_NAME
    with server.client() as c:
        detail = c.get(f"/models/{OTHER}").json()
    page.get_by_label("Classify with").select_option(OTHER)
    page.wait_for_function("v => document.getElementById('figures').textContent.includes(v)",
                           arg=detail["manifest"]["version"] + " (latest")
    clean = re.search(r"Clean test images(\d+\.\d) % right", page.text_content("#figures") or "")
    assert clean and float(clean[1]) == pytest.approx(100 * detail["manifest"]["metrics"]["clean_accuracy"], abs=0.051)
    page.get_by_role("button", name="Blank image").click()
    assert f"· {OTHER} {detail['manifest']['version']}" in _verdict(visit)["reason"]

    # a manifest with an angle histogram: the class's training angles drawn as bars
    page.get_by_label("Classify with").select_option(FIXTURE)
    page.wait_for_function(f"() => document.getElementById('reason').textContent.includes('{FIXTURE}')")
    bins = page.locator("#angle-chart rect.bin").count()
    assert bins >= 5 and page.is_hidden("#histogram-note")
    assert "training images lie at least this far" in page.text_content("#angle-summary")
    visit.assert_only_own_origin()


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_an_image_dropped_or_pasted_is_classified(visit: Visit, how: str) -> None:
    """The browser's own drop and paste events, carrying a Fashion-MNIST PNG as a File."""
    img = load_fashion_mnist_test(3)[2]  # test image 2: a Trouser
    visit.page.evaluate("""([how, bytes]) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], how + '.png', {type: 'image/png'}));
        if (how === 'drop') {
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
        } else {
            document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));
        }
    }""", [how, list(png_bytes(img))])
    shown = _verdict(visit)
    assert shown["top"].startswith("Trouser")
    assert f"You sent: {how}.png, 28×28 PNG" == visit.page.text_content("#original-caption")
    visit.assert_only_own_origin()


def test_keyboard_and_a_phone_width_screen(visit: Visit) -> None:
    page = visit.page
    page.set_viewport_size({"width": 375, "height": 740})
    page.focus("#model")
    for _ in range(40):  # Tab from the model picker to the Sneaker example, then Enter
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent.trim()") == "Sneaker":
            break
    else:
        pytest.fail("Tab never reached the Sneaker example")
    page.keyboard.press("Enter")
    assert _verdict(visit)["top"].startswith("Sneaker")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    unlabelled = page.evaluate("""() => Array.from(document.querySelectorAll('button, select, input'))
        .filter(e => !(e.labels && e.labels.length) && !e.textContent.trim() && !e.getAttribute('aria-label'))
        .map(e => e.outerHTML)""")
    assert unlabelled == []
    visit.assert_only_own_origin()


def test_live_panel_shows_the_services_own_counters(visit: Visit, server: ServerHandle) -> None:
    visit.page.get_by_role("button", name="Bag").click()
    _verdict(visit)
    with server.client() as c:
        stats = c.get("/stats").json()
    expected = f"{stats['classified']} input{'s' if stats['classified'] != 1 else ''} classified, " \
               f"{stats['rejected']} rejected"
    visit.page.wait_for_function("t => document.getElementById('live-summary').textContent.includes(t)",
                                 arg=expected)
    visit.page.wait_for_function("t => document.getElementById('live-summary').textContent.includes(t)",
                                 arg=f"{stats['attack_queries']} attack quer")
    rows = visit.page.eval_on_selector_all("#live-classes tbody tr th", "ths => ths.map(t => t.textContent)")
    assert "Bag" in rows
    visit.assert_only_own_origin()


def test_the_page_runs_as_es_modules_of_its_own_origin(visit: Visit) -> None:
    """Every module of app/static fetched from the service, none refused by the policy or for its
    MIME type (either is a console error), and the page started (the model picker filled)."""
    static = Path(__file__).resolve().parents[2] / "app" / "static"
    modules = {f"{visit.origin}/assets/page/{p.name}" for p in static.glob("*.js")}
    assert len(modules) > 1 and modules <= set(visit.requests)
    assert visit.page.input_value("#model") == MODEL_NAME
    visit.assert_only_own_origin()


def test_docs_and_redoc_list_the_operations_from_local_assets(visit: Visit, server: ServerHandle) -> None:
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    operations = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    page = visit.page
    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock-summary")
    shown = set(zip(
        page.eval_on_selector_all(".opblock-summary-method", "els => els.map(e => e.textContent.trim())"),
        page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path || e.textContent)"),
        strict=True,
    ))
    assert shown == operations
    page.goto(server.url + "/redoc")
    page.wait_for_selector("text=Classify one image and show why")
    assert page.locator("[data-section-id^='operation/']").count() >= len(operations)
    visit.assert_only_own_origin()


def test_an_attack_query_shows_that_the_model_gives_no_answer(visit: Visit) -> None:
    """Square's queries on one test image, picked one after another: once the service sees the attack,
    the page says the answer is withheld and shows no class, probability, angle or chart."""
    x = load_fashion_mnist_test(1234)[1233].astype(np.float32)[None] / 255
    shown: dict[str, Any] = {}
    for i, q in enumerate(square_queries(x, 12)):
        with visit.page.expect_response(lambda r: "/explain" in r.url):
            _pick(visit, f"query-{i}.png", png_bytes(np.rint(q[0] * 255).astype(np.uint8)))
        visit.page.wait_for_function("() => !document.getElementById('status').textContent")
        shown = visit.page.evaluate("""() => ({
            text: document.getElementById('verdict-text').textContent,
            reason: document.getElementById('reason').textContent,
            top: document.querySelectorAll('#top-classes li').length,
            chart: document.getElementById('angle-chart').childElementCount,
            summary: document.getElementById('angle-summary').textContent,
        })""")
        if shown["reason"].startswith("query history"):
            break
    assert i >= 1 and shown["reason"].startswith("query history: the model's answer withheld"), shown
    assert "gives no answer from the model" in shown["text"] and "null" not in shown["text"]
    assert (shown["top"], shown["chart"]) == (0, 0) and "No angle" in shown["summary"]
    visit.assert_only_own_origin()
