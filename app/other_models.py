"""The store's other models, for the page: `POST /explain?model=NAME` may classify with a model
of the store other than the served one (the page's model picker).

Each is that model's latest version, built exactly as the served one is (verified, warmed,
its own micro-batcher: `Service._build`) on first use and kept. When a newer version has
appeared in the store, the next use loads it and retires the old one (its queue drained, as a
reload does). At most `limit` models are kept; /classify, /v2 and /admin/reload never see them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from app.engine import ModelRuntime
from app.model_store import ModelStoreError, find_version

log = logging.getLogger("dsphere.other_models")


class TooManyModelsError(ModelStoreError):
    """The page asked for one more model than DSPHERE_OTHER_MODELS allows (409)."""

    status_code = 409


class OtherModels:
    def __init__(self, build: Callable[[str, str], ModelRuntime], store: Path, limit: int) -> None:
        self._build = build  # (name, version) -> a warmed runtime, not yet started
        self._store = store
        self.limit = limit
        self._runtimes: dict[str, ModelRuntime] = {}
        self._lock = asyncio.Lock()  # one load at a time: two first requests load a model once
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def loaded(self) -> dict[str, str]:
        """name -> version of each model kept."""
        return {name: rt.version for name, rt in self._runtimes.items()}

    async def get(self, name: str) -> ModelRuntime:
        """The runtime of `name`'s latest version; ModelStoreError (404, 409) when it cannot be served."""
        version = find_version(self._store, name, "latest")
        rt = self._runtimes.get(name)
        if rt is not None and rt.version == version:
            return rt
        async with self._lock:
            rt = self._runtimes.get(name)
            if rt is not None and rt.version == version:
                return rt
            if rt is None and len(self._runtimes) >= self.limit:
                raise TooManyModelsError(
                    f"model '{name}' is not served here: this service loads at most {self.limit} model(s) "
                    "of the store besides the one it serves (DSPHERE_OTHER_MODELS)"
                )
            new = await asyncio.to_thread(self._build, name, version)
            new.start()
            self._runtimes[name] = new
            log.info("loaded %s/%s for the page (POST /explain)", name, version)
        if rt is not None:
            task = asyncio.get_running_loop().create_task(rt.close())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return new

    async def close(self) -> None:
        """Drain and stop every runtime kept (and those still retiring)."""
        await asyncio.gather(*(rt.close() for rt in self._runtimes.values()), *self._retiring,
                             return_exceptions=True)
        self._runtimes.clear()
