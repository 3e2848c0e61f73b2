"""GET / and its files, /docs and /redoc: served by the app itself, nothing from another origin,
the page small, its scripts ES modules of its own; the bundled example images are what they say
(app/page.py, app/docs.py)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.docs import ASSETS_URL as DOCS_ASSETS
from app.page import CONTENT_SECURITY_POLICY, STATIC_DIR
from support.fashion_mnist import load_fashion_mnist_test

pytestmark = pytest.mark.anyio

PAGE_BUDGET_BYTES = 300_000
EXAMPLES = STATIC_DIR / "examples"
# Any URL with a scheme or a network path (//host): the page must fetch nothing from elsewhere.
ABSOLUTE_URL = re.compile(r"""(?:https?:|wss?:|ftp:)?//[a-z0-9.-]+\.[a-z]{2,}""", re.IGNORECASE)
ENTRY = "page.js"
# a module's static imports (import "x", import ... from "x", export ... from "x"); any import()
IMPORT = re.compile(r"""^\s*(?:import\s*|(?:import|export)\b[^"';]*?\bfrom\s*)["']([^"']+)["']""", re.MULTILINE)
DYNAMIC_IMPORT = re.compile(r"""\bimport\s*\(""")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Refs(HTMLParser):
    """Every src and href of a document."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        self.tags.append({"tag": tag, **dict(attrs)})


def refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.refs


def tags(html: str) -> list[dict[str, str | None]]:
    parser = _Refs()
    parser.feed(html)
    return parser.tags


async def test_page_is_served_with_a_policy_that_allows_only_its_own_origin(make_client) -> None:
    async with make_client() as c:
        r = await c.get("/")
        assets = {u: await c.get(u) for u in refs(r.text) if u.startswith("/assets/")}
        links = {u: (await c.get(u)).status_code for u in refs(r.text) if not u.startswith("/assets/")}
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "http" not in CONTENT_SECURITY_POLICY
    assert {u: a.status_code for u, a in assets.items()} == dict.fromkeys(assets, 200)
    modules = {f"/assets/page/{p.name}" for p in STATIC_DIR.glob("*.js")}
    assert {"/assets/page/page.css", "/assets/page/favicon.svg"} | modules <= set(assets)
    assert {u: a.headers["content-type"].split(";")[0] for u, a in assets.items() if u in modules} \
        == dict.fromkeys(modules, "text/javascript")
    assert links == {"/docs": 200, "/redoc": 200}
    total = len(r.content) + sum(len(a.content) for a in assets.values())
    assert total < PAGE_BUDGET_BYTES


def test_every_page_file_is_small_and_names_no_other_origin() -> None:
    files = [p for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < PAGE_BUDGET_BYTES
    for p in files:
        if p.suffix in (".html", ".js", ".css", ".svg"):
            text = p.read_text()
            assert not ABSOLUTE_URL.search(text.replace("http://www.w3.org/2000/svg", "")), p


def test_the_page_runs_one_module_that_imports_only_the_pages_own_modules() -> None:
    """index.html runs page.js as an ES module and preloads the others (all in one round, and so
    counted in the page's size above); every import is a module of app/static by a relative path,
    none dynamic, and every module is reached from page.js."""
    html = (STATIC_DIR / "index.html").read_text()
    scripts = [t for t in tags(html) if t["tag"] == "script"]
    assert scripts == [{"tag": "script", "type": "module", "src": f"/assets/page/{ENTRY}"}]
    preloaded = {t["href"] for t in tags(html) if t["tag"] == "link" and t.get("rel") == "modulepreload"}
    modules = {p.name for p in STATIC_DIR.glob("*.js")}
    assert preloaded == {f"/assets/page/{m}" for m in modules - {ENTRY}}
    assert not [p for p in STATIC_DIR.rglob("*.js") if p.parent != STATIC_DIR]
    reached, todo = set(), [ENTRY]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        text = (STATIC_DIR / name).read_text()
        assert not DYNAMIC_IMPORT.search(text), name
        for spec in IMPORT.findall(text):
            assert re.fullmatch(r"\./[a-z][a-z0-9-]*\.js", spec), (name, spec)
            assert spec[2:] in modules, (name, spec)
            todo.append(spec[2:])
    assert reached == modules


@pytest.mark.parametrize(("path", "assets"), [
    ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]),
    ("/redoc", ["redoc.standalone.js"]),
])
async def test_api_docs_load_their_assets_from_the_service(make_client, path: str, assets: list[str]) -> None:
    async with make_client() as c:
        r = await c.get(path)
        served = {a: (await c.get(f"{DOCS_ASSETS}/{a}")).status_code for a in assets}
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not ABSOLUTE_URL.search(r.text), r.text
    for a in assets:
        assert f"{DOCS_ASSETS}/{a}" in r.text
    assert "/openapi.json" in r.text
    assert served == dict.fromkeys(assets, 200)


async def test_asset_requests_are_counted_under_their_mount(make_client) -> None:
    async with make_client() as c:
        await c.get("/assets/page/page.js")
        await c.get(f"{DOCS_ASSETS}/swagger-ui.css")
        await c.get("/assets/page/missing.js")
        await c.get("/nowhere")
        metrics = (await c.get("/metrics")).text
    assert 'dsphere_requests_total{endpoint="/assets/page/{path}",status="200"} 1.0' in metrics
    assert 'dsphere_requests_total{endpoint="/assets/page/{path}",status="404"} 1.0' in metrics
    assert 'dsphere_requests_total{endpoint="/assets/docs/{path}",status="200"} 1.0' in metrics
    assert 'dsphere_requests_total{endpoint="unmatched",status="404"} 1.0' in metrics


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert (img.mode, img.size) == ("L", (28, 28))
        return np.asarray(img)


def test_examples_are_what_the_page_says() -> None:
    """fashion-mnist-NNNNN.png: Fashion-MNIST test image NNNNN; noise.png: uniform noise of
    numpy's default_rng(0); blank.png and white.png: 0 and 255 everywhere. Each one is offered
    by a button of the page, and each button's file exists."""
    files = sorted(p.name for p in EXAMPLES.iterdir())
    offered = re.findall(r'data-example="([^"]+)"', (STATIC_DIR / "index.html").read_text())
    assert sorted(offered) == files
    fashion = [f for f in files if f.startswith("fashion-mnist-")]
    assert len(fashion) >= 3 and {"noise.png", "blank.png", "white.png"} <= set(files)
    test_images = load_fashion_mnist_test(1 + max(int(f[14:19]) for f in fashion))
    for f in fashion:
        np.testing.assert_array_equal(_pixels(EXAMPLES / f), test_images[int(f[14:19])], err_msg=f)
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(_pixels(EXAMPLES / "noise.png"), noise)
    assert (_pixels(EXAMPLES / "blank.png") == 0).all() and (_pixels(EXAMPLES / "white.png") == 255).all()
