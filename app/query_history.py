"""The query-history detector: sees a query attack while it runs (docs/QUERY_HISTORY.md).

Every input the service classifies, as the model sees it, is judged against the history of
recent queries (app/history_store.py) by its salted fingerprint
(app/fingerprint.py): an input whose fingerprint shares at least `threshold` of
its hashes with one recent query is an attack query (Blacklight's rule). What happens then is the action: "reject"
(the verdict becomes reject, reason "query_history") or "flag" (counted and logged only).

An exact repeat of an earlier input (a retry, a cache) is no evidence: it is answered with the
decision its first query got and its fingerprint is not stored again. When the shared store
cannot be reached the detector stands aside for `retry_s` (every input is judged by the
per-input verdict alone), says so in /healthz and `dsphere_query_history_store_up`, and tries
again; no request fails because of it.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from app.fingerprint import Fingerprinter, FingerprintParams
from app.history_store import HistoryStore, LocalStore, RedisStore, SharedStore, StoreUnavailable, table_slots

log = logging.getLogger("dsphere.query_history")


@dataclass(frozen=True)
class HistoryConfig:
    action: str = "reject"  # "reject", "flag" or "off"
    threshold: int = 15  # shared hashes (of `params.hashes`) that make a query an attack query
    params: FingerprintParams = FingerprintParams()
    salt: bytes | None = None  # None: a random one (shared through Redis when Redis is the store)
    redis_url: str | None = None
    shared_dir: Path | None = None  # a directory every worker of this host maps one table in
    table_mb: float = 32.0  # the table's size in MB (10^6 bytes), 8 bytes a slot
    ttl_s: float = 24 * 3600.0
    exact_capacity: int = 100_000
    retry_s: float = 5.0


@dataclass(frozen=True)
class Judgement:
    attack: NDArray[np.bool_]  # (N,) attack queries (whatever the action)
    repeat: NDArray[np.bool_]  # (N,) exact repeats of earlier inputs
    checked: bool  # False: the detector was off or its store unreachable
    digests: list[bytes] | None = None  # each input's keyed digest (when checked)


class QueryHistory:
    def __init__(self, cfg: HistoryConfig, on_error: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.on_error = on_error
        self.store: HistoryStore | None = None
        self.fingerprinter: Fingerprinter | None = None
        self.error: str | None = None
        self._down_until = 0.0

    @property
    def enabled(self) -> bool:
        return self.cfg.action != "off"

    @property
    def rejects(self) -> bool:
        return self.cfg.action == "reject"

    async def start(self) -> None:
        if not self.enabled:
            return
        salt = self.cfg.salt or secrets.token_bytes(32)
        if self.cfg.redis_url:
            store = self.store if isinstance(self.store, RedisStore) else RedisStore(  # a retry keeps its client
                self.cfg.redis_url, table_slots(self.cfg.table_mb), self.cfg.ttl_s, self.cfg.threshold)
            self.store = store
            if self.cfg.salt is None:
                try:
                    salt = await store.shared_salt(salt)
                except StoreUnavailable as exc:
                    self._unavailable(exc)
                    self.fingerprinter = None  # no shared salt yet: judged again once Redis answers
                    return
        elif self.cfg.shared_dir is not None:
            shared = SharedStore(self.cfg.shared_dir, table_slots(self.cfg.table_mb), self.cfg.ttl_s,
                                 self.cfg.threshold)
            self.store = shared
            if self.cfg.salt is None:
                salt = shared.shared_salt(salt)
        else:
            self.store = LocalStore(table_slots(self.cfg.table_mb), self.cfg.ttl_s, self.cfg.exact_capacity,
                                    self.cfg.threshold)
        self.fingerprinter = Fingerprinter(salt, self.cfg.params)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()

    @property
    def available(self) -> bool:
        return self.enabled and self.error is None

    async def judge(self, x: NDArray[np.float32]) -> Judgement:
        """x: (N, C, H, W) model inputs. Each row against the history and the rows before it."""
        n = len(x)
        none = Judgement(np.zeros(n, bool), np.zeros(n, bool), checked=False)
        if not self.enabled or self.store is None or time.monotonic() < self._down_until:
            return none
        try:
            if self.fingerprinter is None:  # Redis was down at start: the shared salt first
                await self.start()
                if self.fingerprinter is None:
                    return none
            result = await self._judge(x, self.store, self.fingerprinter)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return none
        if self.error is not None:
            log.warning("query history: store %s reachable again", self.store.kind)
            self.error = None
            await self._adopt_shared_salt()
        return result

    async def _adopt_shared_salt(self) -> None:
        """After Redis was unreachable (perhaps restarted, empty): publish this process's salt
        again, or take the one another process published meanwhile, so that every process keeps
        fingerprinting alike. An empty Redis holds no history worth keeping a salt for."""
        if self.cfg.salt is not None or not isinstance(self.store, RedisStore) or self.fingerprinter is None:
            return
        try:
            salt = await self.store.shared_salt(self.fingerprinter.salt)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return
        if salt != self.fingerprinter.salt:
            log.warning("query history: Redis holds another salt (restarted?); fingerprinting with it from now on")
            self.fingerprinter = Fingerprinter(salt, self.cfg.params)

    async def _judge(self, x: NDArray[np.float32], store: HistoryStore, fp: Fingerprinter) -> Judgement:
        digests = fp.digests(x)
        first: dict[bytes, int] = {}  # each distinct input's first row (the same input twice: a repeat)
        for i, d in enumerate(digests):
            first.setdefault(d, i)
        rows = list(first.values())
        known, attacks = await store.check(list(first), lambda js: fp.fingerprints(x[[rows[j] for j in js]]),
                                           [secrets.randbits(24) for _ in rows])
        attack, repeat = np.zeros(len(x), bool), np.zeros(len(x), bool)
        for i, k, a in zip(rows, known, attacks, strict=True):
            attack[i], repeat[i] = (k, True) if k is not None else (a, False)
        for i, d in enumerate(digests):
            if first[d] != i:
                attack[i], repeat[i] = attack[first[d]], True
        return Judgement(attack, repeat, checked=True, digests=digests)

    @property
    def store_kind(self) -> str:
        return "redis" if self.cfg.redis_url else "shared" if self.cfg.shared_dir is not None else "memory"

    def _unavailable(self, exc: StoreUnavailable) -> None:
        self.on_error()
        if self.error is None:
            log.error("query history: store %s unreachable (%s); classifying with the per-input verdict only, "
                      "retrying every %.0f s", self.store_kind, exc, self.cfg.retry_s)
        self.error = str(exc)
        self._down_until = time.monotonic() + self.cfg.retry_s

    async def size(self) -> tuple[int, int] | None:
        if self.store is None or not self.available:
            return None
        try:
            return await self.store.size()
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return None
