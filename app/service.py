"""The service's state: settings, metrics, quarantine and the model runtime being served, and
the one way it classifies.

`classify` is what every route that classifies awaits (/classify, /classify/batch, /explain, /v2
infer): each input judged against the query history (app/query_history.py: an attack query is
rejected, reason "query_history", or only flagged), the runtime's verdicts (an exact repeat
answered from the result cache), counted in the metrics, each rejected input kept in the
quarantine; no route calls `ModelRuntime.classify` itself. `classifications` maps verdicts to
the response model.

`load` (startup) and `reload` (admin) build a new ModelRuntime completely (verify, session,
warm-up) before swapping one reference; requests that already hold the old runtime finish on
it, then the old batcher is drained and closed. The page's POST /explain may also classify
with the store's other models (app/other_models.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.engine import ModelRuntime, Ticket
from app.manifest import MODEL_FILE
from app.metrics import Metrics
from app.model_store import ModelInvalidError, ModelStoreError, load_version
from app.other_models import OtherModels
from app.quarantine import Quarantine
from app.query_history import HistoryConfig, Judgement, QueryHistory
from app.recent import RecentCounters, server_started
from app.result_cache import ResultCache
from app.schemas import Classification, QueryHistoryHealth
from app.served_file import ServedModelFile
from app.settings import Settings
from app.verdict import Verdicts

log = logging.getLogger("dsphere.service")


class NotReadyError(Exception):
    pass


class Service:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime: ModelRuntime | None = None
        self.load_error: str | None = "model not loaded yet"
        self.quarantine: Quarantine | None = (
            Quarantine(settings.quarantine_dir, settings.quarantine_max_bytes) if settings.quarantine_dir else None
        )
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.other_models = OtherModels(self._build, settings.model_store, settings.other_models)
        # GET /stats; sampled while the app runs (app/main.py)
        self.recent = RecentCounters(metrics, counters_zero_at=server_started())
        self.history = QueryHistory(history_config(settings), on_error=metrics.history.errors.inc)
        self.results = ResultCache(settings.query_history_result_cache)
        self.served_file = ServedModelFile(settings.served_model_file) if settings.served_model_file else None
        self._attack_log = _EveryMinute()

    def current(self) -> ModelRuntime:
        rt = self.runtime
        if rt is None or not rt.warmed:
            raise NotReadyError(f"model not ready: {self.load_error or 'loading'}")
        return rt

    async def runtime_for(self, name: str | None) -> ModelRuntime:
        """The served runtime when `name` is None or its name; else the store's model `name`
        (latest version) for the page: ModelStoreError (404, 409) when it cannot be served."""
        served = self.runtime.name if self.runtime is not None else self.settings.model_name
        if name is None or name == served:
            return self.current()
        return await self.other_models.get(name)

    async def classify(self, rt: ModelRuntime, x: NDArray[np.float32], ticket: Ticket, request_id: str,
                       originals: Callable[[int], tuple[bytes, str]], batch: bool = False) -> Verdicts:
        """`rt`'s verdicts on x ([N, C, H, W] or one [C, H, W]), counted in the metrics; each rejected row
        kept in the quarantine: `originals(i)` is row i's input as received and its file extension,
        stored with its classification (and `index` i when `batch`)."""
        rows = x.reshape(-1, *x.shape[-3:])
        t0 = time.perf_counter()
        judged = await self.history.judge(rows)
        self._count_history(judged, time.perf_counter() - t0, request_id)
        v = self.results.get(rt.model.sha256, judged)
        if v is None:
            v = await rt.classify(x, ticket)
            self.results.put(rt.model.sha256, judged, v)
        if self.history.rejects and judged.attack.any():
            # an attack query is rejected and gets no answer from the model: no label, probability or
            # angle for the attack to learn from (the quarantine and the metrics still see them)
            v = dataclasses.replace(v, accepted=v.accepted & ~judged.attack, withheld=judged.attack)
        self.metrics.observe_verdicts(rt.name, rt.version, rt.model.manifest.class_names, v)
        q = self.quarantine
        if q is not None:
            for i in np.flatnonzero(~v.accepted).tolist():
                data, ext = originals(i)
                (result,) = classification_dicts(rt, v[i : i + 1], request_id, reveal=True)
                record = {**result, "index": i if batch else None}
                await asyncio.to_thread(q.add, data, ext, record)
        return v

    def _count_history(self, judged: Judgement, seconds: float, request_id: str) -> None:
        m, store = self.metrics.history, self.history.store_kind
        m.set_up(store, judged.checked or not self.history.enabled)
        if not judged.checked:
            return
        attacks = int(judged.attack.sum())
        m.observe(len(judged.attack), attacks, int(judged.repeat.sum()), self.settings.query_history_action,
                          seconds)
        count = self._attack_log.add(attacks) if attacks else None
        if count:
            log.warning("query history: %d attack queries (action %s) in the last minute or less, e.g. request %s",
                        count, self.settings.query_history_action, request_id)

    def history_health(self) -> QueryHistoryHealth:
        h = self.history
        status = "off" if not h.enabled else ("unavailable" if h.error else "ok")
        return QueryHistoryHealth(action=self.settings.query_history_action, store=h.store_kind,  # type: ignore[arg-type]
                                  status=status, error=h.error)  # type: ignore[arg-type]

    async def update_history_gauges(self) -> None:
        """The store's size and memory (GET /metrics reads them when it is scraped)."""
        size = await self.history.size()
        store = self.history.store_kind
        self.metrics.history.set_up(store, self.history.available or not self.history.enabled)
        if size is not None:
            self.metrics.history.entries.labels(store).set(size[0])
            self.metrics.history.bytes.labels(store).set(size[1])

    def _build(self, name: str, version: str) -> ModelRuntime:
        s = self.settings
        model = load_version(s.model_store, name, version, s.provider_list, s.intra_op_threads, s.runtime_backend,
                             s.precision, s.rho)
        rt = ModelRuntime(
            model,
            rho=s.rho,
            max_batch=s.batch_size,
            max_delay_s=s.batch_delay_s,
            queue_size=s.queue_size,
            on_batch=self.metrics.batch_size.observe,
            on_queue_depth=self.metrics.queue_depth.set,
            inline_max_s=s.inline_batch_us / 1e6,
        )
        try:
            rt.warmup()
        except Exception as exc:  # verified but not runnable, e.g. a batch size fixed at export
            raise ModelInvalidError(f"{model.path / MODEL_FILE}: warm-up inference failed ({exc})") from None
        return rt

    async def load(self) -> None:
        """Startup load of the configured model; failure is logged and reported by /readyz."""
        s = self.settings
        await self.history.start()
        if self.history.enabled:
            log.info("query history: %s, store %s%s, threshold %d of %d hashes, ttl %.0f s",
                     s.query_history_action, self.history.store_kind, f" ({self.history.error})" if self.history.error
                     else "", s.query_history_threshold, self.history.cfg.params.hashes, s.query_history_ttl_s)
        # a worker started after a reload of the others (DSPHERE_SERVED_MODEL_FILE) serves what they serve
        shared = self.served_file.read() if self.served_file is not None else None
        for name, version in [*([shared] if shared else []), (s.model_name, s.model_version)]:
            try:
                rt = await asyncio.to_thread(self._build, name, version)
            except ModelStoreError as exc:
                self.load_error = str(exc)
                log.error("cannot load model %s (%s): %s", name, version, exc)
                continue
            self._install(rt)
            return

    def _install(self, rt: ModelRuntime) -> None:
        rt.start()
        self.runtime = rt
        self.load_error = None
        m = rt.model
        self.metrics.set_model(m.name, m.version, m.sha256, m.provider)
        self.metrics.set_runtime(m.name, m.version, m.runner.info)
        log.info(
            "serving %s/%s sha256=%s on %s (providers=%s) rho=%.4f batch_size=%d batch_delay_ms=%.2f",
            m.name, m.version, m.sha256[:12], m.runner.info.path, list(m.providers), rt.rho,
            self.settings.batch_size, self.settings.batch_delay_ms,
        )

    async def reload(self, name: str, version: str, publish: bool = True) -> tuple[ModelRuntime | None, ModelRuntime]:
        """Load `name`/`version` and swap it in; raises ModelStoreError and keeps the old one. `publish`:
        the other workers follow (DSPHERE_SERVED_MODEL_FILE, app/served_file.py)."""
        async with self._reload_lock:
            new = await asyncio.to_thread(self._build, name, version)
            old = self.runtime
            self._install(new)
            if old is not None:
                task = asyncio.get_running_loop().create_task(old.close())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            if publish and self.served_file is not None:
                self.served_file.write(new.name, new.version, new.model.sha256)
            return old, new

    async def follow(self, poll_s: float = 0.5) -> None:
        """Serve the version another worker's reload wrote to DSPHERE_SERVED_MODEL_FILE (until cancelled)."""
        f = self.served_file
        while f is not None:
            await asyncio.sleep(poll_s)
            if not f.changed() or (wanted := f.read()) is None:
                continue
            rt = self.runtime
            if rt is not None and (rt.name, rt.version) == wanted:
                continue
            try:
                await self.reload(*wanted, publish=False)
                log.info("reloaded %s/%s as another worker did", *wanted)
            except Exception as exc:  # ModelStoreError, or anything else: the follower itself keeps running
                log.error("cannot serve %s/%s as another worker does: %s", *wanted, exc)

    async def close(self) -> None:
        """Drain: every queued request is answered, then the workers stop."""
        rt = self.runtime
        if rt is not None:
            await rt.close()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.other_models.close()
        await self.history.close()


def history_config(s: Settings) -> HistoryConfig:
    salt = s.query_history_salt.get_secret_value().encode() if s.query_history_salt else None
    return HistoryConfig(action=s.query_history_action, threshold=s.query_history_threshold, salt=salt,
                         redis_url=s.query_history_redis_url, shared_dir=s.query_history_shared_dir,
                         table_mb=s.query_history_table_mb,
                         ttl_s=s.query_history_ttl_s)


class _EveryMinute:
    """At most one log line a minute, with how many events it stands for."""

    def __init__(self) -> None:
        self.last, self.since = -60.0, 0

    def add(self, n: int) -> int | None:
        """Count n events; the count since the last line when a line is due, else None."""
        self.since += n
        now = time.monotonic()
        if now - self.last < 60:
            return None
        self.last, count, self.since = now, self.since, 0
        return count


def classifications(rt: ModelRuntime, v: Verdicts, request_id: str) -> list[Classification]:
    """The response model of each row of `v`, verdicts of `rt`."""
    return [Classification.model_validate(d) for d in classification_dicts(rt, v, request_id)]


def classification_dicts(rt: ModelRuntime, v: Verdicts, request_id: str, reveal: bool = False) -> list[dict[str, Any]]:
    """Each row of `v` (verdicts of `rt`) as the `Classification` response model dumps it (its fields, in
    its order, of plain JSON types): what the classifying routes encode once, with no second pass. A row
    whose answer is withheld (reason query_history) has null for the model's outputs unless `reveal`
    (the quarantine's record, for the operator)."""
    names = rt.model.manifest.class_names
    ref = {"name": rt.name, "version": rt.version}
    out = []
    for label, probability, angle, threshold, verdict, reason, withheld in zip(
        v.labels.tolist(), v.probabilities.tolist(), v.angles_deg.tolist(), v.thresholds_deg.tolist(),
        v.names(), v.reasons(), v.withheld.tolist(), strict=True,
    ):
        hidden = withheld and not reveal
        out.append({
            "label": None if hidden else label,
            "class_name": None if hidden else names[label],
            "probability": None if hidden else probability,
            "angle_deg": None if hidden else angle,
            "threshold_deg": None if hidden else threshold,
            "verdict": verdict,
            "reason": reason,
            "model": dict(ref),
            "request_id": request_id,
        })
    return out
