from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from app.main import create_app
from app.settings import load_settings
from support.fake_store import write_version

ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    s = tmp_path / "store"
    write_version(s, "1")
    return s


@pytest.fixture
def make_client(store: Path) -> Callable[..., Any]:
    """make_client(**settings) -> async context manager yielding an httpx client (lifespan run)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def _make(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        kw: dict[str, Any] = {"model_store": store, "batch_delay_ms": 0.5}
        kw.update(overrides)
        settings = load_settings(**kw)
        app = create_app(settings, CollectorRegistry())
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                client.app = app  # type: ignore[attr-defined]
                yield client

    return _make
