"""A classifier seen only through the service's API, for query attacks (bench/attack_service.py).

`ApiClient.infer(x)` sends rows [N, 1, 28, 28] in [0, 1] as JSON V2 infer requests (at most
`max_rows` rows a request, round-robin over one HTTP client per local source address) and
returns what the API answered for each row: label, accepted, reason, probability, angle,
threshold. Nothing else of the model is seen.

`ApiPredict` is the `predict_fn` of ART's `BlackBoxClassifier`: it turns those answers into the
vector an attack needs, counts every row it sends against its image's `Ledger` (one per attacked
image: queries sent, the first answer with reason query_history, the first accepted-and-wrong
answer within eps of the clean image) and keeps the query budget. An identical row sent again for
the same image is answered from the attacker's own cache and not sent (ART's Square asks for the
scores of its current iterate at every iteration; a real attacker keeps them).

What the attack is given, per row (y: the true label of the attacked image):
- "scores": a probability vector built from the margin `margin()` (the served rule in the loss):
  m = 1 + probability when the label is y (accepted or not); m = 0.01 + min(0.99, (angle - threshold)
  / 45) when the label is wrong but rejected by the angle (near the cone: near success); m = -(0.01 +
  min(0.99, (threshold - angle) / 45)) when accepted and wrong (success, the deeper in the cone the
  lower); m = 2 when rejected with reason query_history (the detector's answer counts as the true
  class, with no information: the service withholds the model's outputs, label -1 and NaN). The
  vector has p[y] = 0.5 + m / 4, p[c] = the rest (c = the answered label when it is a wrong class,
  else (y + 1) mod 10), 1e-4 elsewhere: argmax != y exactly when the answer is accepted and wrong,
  and p[y] - max(others) falls with m.
- "decision": one-hot of the answered label when it is accepted and wrong, else one-hot of y (a
  rejected answer counts as the true class).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
from numpy.typing import NDArray

EPS = 0.1
NB_CLASSES = 10
HISTORY = "query_history"
OUTPUTS = ("label", "accepted", "reason", "probability", "angle_deg", "threshold_deg")
MARGIN_SCALE_DEG = 45.0
_TINY = 1e-4


class BudgetExhausted(Exception):
    """Every image of this predictor has used its query budget."""


class Stalled(BudgetExhausted):
    """A per-image attack asked only for rows it had already sent, `STALL_CALLS` calls in a row: a loop that
    would never end on free cached answers (e.g. HopSkipJump halving its step on an always-rejected point)."""


STALL_CALLS = 500


class Detected(Exception):
    """Raised by an ApiPredict with stop_on_detection when an answer has reason query_history."""


@dataclass
class Answers:
    label: NDArray[np.int64]
    accepted: NDArray[np.bool_]
    reason: list[str]
    probability: NDArray[np.float64]
    angle: NDArray[np.float64]
    threshold: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.label)

    @property
    def history(self) -> NDArray[np.bool_]:
        return np.array([r == HISTORY for r in self.reason], bool)

    def row(self, i: int) -> tuple[int, bool, str, float, float, float]:
        return (int(self.label[i]), bool(self.accepted[i]), self.reason[i], float(self.probability[i]),
                float(self.angle[i]), float(self.threshold[i]))


class ApiClient:
    """V2 JSON infer against `url` for model `model`; `local_addresses`: source addresses to spread requests over."""

    def __init__(self, url: str, model: str, local_addresses: Sequence[str | None] = (None,), max_rows: int = 64,
                 timeout: float = 120) -> None:
        self.path = f"/v2/models/{model}/infer"
        self.max_rows = max_rows
        self.clients = [
            httpx.Client(base_url=url, timeout=timeout, trust_env=False, verify=False,
                         transport=httpx.HTTPTransport(local_address=a, retries=2) if a else None)
            for a in local_addresses
        ]
        self._lock = threading.Lock()
        self._next = 0
        self.requests = 0
        self.rows = 0

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def _client(self) -> httpx.Client:
        with self._lock:
            c = self.clients[self._next % len(self.clients)]
            self._next += 1
            self.requests += 1
            return c

    def infer(self, x: NDArray[np.floating]) -> Answers:
        x = np.ascontiguousarray(x, np.float32).reshape(-1, 1, 28, 28)
        parts = [self._infer(x[i: i + self.max_rows]) for i in range(0, len(x), self.max_rows)]
        with self._lock:
            self.rows += len(x)
        cat = [np.concatenate([p[k] for p in parts]) for k in (0, 1, 3, 4, 5)]
        reasons: list[str] = [r for p in parts for r in p[2]]
        return Answers(cat[0], cat[1], reasons, cat[2], cat[3], cat[4])

    def _infer(self, x: NDArray[np.float32]) -> list:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
                "outputs": [{"name": o} for o in OUTPUTS]}
        r = self._client().post(self.path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"V2 infer answered {r.status_code}: {r.text[:300]}")
        out = {o["name"]: o["data"] for o in r.json()["outputs"]}
        return [np.asarray(out["label"], np.int64), np.asarray(out["accepted"], bool), list(out["reason"]),
                np.asarray(out["probability"], np.float64), np.asarray(out["angle_deg"], np.float64),
                np.asarray(out["threshold_deg"], np.float64)]


def margin(label: int, accepted: bool, reason: str, probability: float, angle: float, threshold: float,
           y: int) -> float:
    """The attack's loss for one answer (module docstring): < 0 exactly when accepted and wrong."""
    if reason == HISTORY:
        return 2.0
    if label == y:
        return 1.0 + probability
    if accepted:
        return -(0.01 + min(0.99, max(0.0, threshold - angle) / MARGIN_SCALE_DEG))
    return 0.01 + min(0.99, max(0.0, angle - threshold) / MARGIN_SCALE_DEG)


def score_vector(m: float, label: int, y: int, k: int = NB_CLASSES) -> NDArray[np.float32]:
    c = label if 0 <= label < k and label != y else (y + 1) % k  # label -1: the service withheld its answer
    v = np.full(k, _TINY, np.float64)
    v[y] = min(1.0 - (k - 1) * _TINY, max(0.0, 0.5 + m / 4))
    v[c] = 1.0 - v[y] - (k - 2) * _TINY
    return v.astype(np.float32)


def decision_vector(label: int, accepted: bool, y: int, k: int = NB_CLASSES) -> NDArray[np.float32]:
    v = np.zeros(k, np.float32)
    v[label if (accepted and label != y) else y] = 1.0
    return v


@dataclass
class Ledger:
    """One attacked image: what its queries cost and what the API answered them."""

    index: int  # test-set index
    x0: NDArray[np.float32]  # [1, 28, 28] clean image
    y: int
    budget: int
    eps: float = EPS
    sent: int = 0
    first_detection: int | None = None  # query number (1-based) of the first answer with reason query_history
    detections: int = 0
    angle_rejections: int = 0
    success_at: int | None = None  # query number of the first accepted-and-wrong answer within eps
    adversarial: int = 0  # accepted-and-wrong answers, any distance
    best_adv_linf: float = float("inf")  # closest accepted-and-wrong query (decision-based: the attack's result)
    best_adv_l2: float = float("inf")
    best_margin: float = float("inf")  # the attacker's best (intended) row so far, by its own loss
    best_row: NDArray[np.float32] | None = None
    stalled: bool = False  # the attack ended in a loop of rows already sent (Stalled)
    cache: dict[bytes, tuple[int, bool, str, float, float, float]] = field(default_factory=dict, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def left(self) -> int:
        return self.budget - self.sent

    def record(self, sent_row: NDArray[np.float32], answer: tuple[int, bool, str, float, float, float]) -> None:
        label, accepted, reason, _, _, _ = answer
        self.sent += 1
        if reason == HISTORY:
            self.detections += 1
            if self.first_detection is None:
                self.first_detection = self.sent
        elif reason == "angle":
            self.angle_rejections += 1
        if accepted and label != self.y:
            self.adversarial += 1
            d = (sent_row - self.x0).ravel()
            linf, l2 = float(np.abs(d).max()), float(np.linalg.norm(d))
            self.best_adv_linf, self.best_adv_l2 = min(self.best_adv_linf, linf), min(self.best_adv_l2, l2)
            if linf <= self.eps + 1e-6 and self.success_at is None:
                self.success_at = self.sent

    def result(self) -> dict[str, object]:
        fin = (lambda v: None if not np.isfinite(v) else round(v, 5))  # noqa: E731
        return {"index": self.index, "label": self.y, "budget": self.budget, "queries": self.sent,
                "success": self.success_at is not None, "queries_to_success": self.success_at,
                "detected": self.first_detection is not None, "queries_to_detection": self.first_detection,
                "detections": self.detections, "angle_rejections": self.angle_rejections,
                "adversarial_answers": self.adversarial, "best_adv_linf": fin(self.best_adv_linf),
                "best_adv_l2": fin(self.best_adv_l2), "stalled": self.stalled}


class Blinder:
    """Query blinding (Chen, Carlini & Wagner 2020): each row, before it is sent, shifted by up to one
    pixel (a random dy, dx in {-1, 0, 1}, zero-filled), its intensities rescaled by a factor in
    [1 - scale, 1 + scale], uniform noise of +-noise added, then projected back into the eps ball of
    the clean image and [0, 1]: what is sent is always within the budget, never the attack's own row."""

    def __init__(self, rng: np.random.Generator, scale: float = 0.05, noise: float = EPS / 2) -> None:
        self.rng, self.scale, self.noise = rng, scale, noise

    def __call__(self, row: NDArray[np.float32], x0: NDArray[np.float32], eps: float) -> NDArray[np.float32]:
        dy, dx = self.rng.integers(-1, 2, 2)
        t = np.zeros_like(row)
        h, w = row.shape[-2:]
        t[..., max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = \
            row[..., max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
        u = t * self.rng.uniform(1 - self.scale, 1 + self.scale) + self.rng.uniform(-self.noise, self.noise, t.shape)
        return np.clip(np.clip(u, x0 - eps, x0 + eps), 0.0, 1.0).astype(np.float32)


class StepController:
    """OARS-style step sizes (Feng et al., CCS 2023): the attack's step is multiplied by `scale`,
    which grows while the detector rejects its queries and shrinks back while it does not."""

    def __init__(self, grow: float = 1.5, shrink: float = 1.25, lo: float = 0.25, hi: float = 256.0) -> None:
        self.scale, self.grow, self.shrink, self.lo, self.hi = 1.0, grow, shrink, lo, hi
        self.history: list[float] = []

    def update(self, rejected_share: float) -> None:
        if rejected_share >= 0.5:
            self.scale *= self.grow ** 2
        elif rejected_share > 0.1:
            self.scale *= self.grow
        elif rejected_share == 0.0:
            self.scale /= self.shrink
        self.scale = float(min(self.hi, max(self.lo, self.scale)))
        self.history.append(self.scale)


class ApiPredict:
    """predict_fn for BlackBoxClassifier (module docstring).

    ledgers: the attacked images; a row belongs to the one whose clean image is nearest (L-inf), so
    one call may carry rows of many images (one request). strict: raise BudgetExhausted as soon as a
    call needs more than an image has left (its rows that fit are sent first); otherwise rows over
    budget are answered "true class" without being sent and BudgetExhausted comes once every image
    is spent. blind: a Blinder. gap_s: the least time between two requests (an attacker slowed past
    the store's expiry). controller: a StepController fed the share of query_history answers.
    stop_on_detection: raise Detected after recording a call that got a query_history answer."""

    def __init__(self, client: ApiClient, ledgers: list[Ledger], mode: str = "scores", *, strict: bool = False,
                 blind: Blinder | None = None, gap_s: float = 0.0, controller: StepController | None = None,
                 stop_on_detection: bool = False, on_sent: Callable[[], None] | None = None) -> None:
        assert mode in ("scores", "decision")
        self.client, self.ledgers, self.mode, self.strict = client, ledgers, mode, strict
        self.blind, self.gap_s, self.controller = blind, gap_s, controller
        self.stop_on_detection = stop_on_detection
        self.on_sent = on_sent
        self._centers = np.stack([L.x0.ravel() for L in ledgers])
        self._last_send = 0.0
        self._idle_calls = 0

    def owners(self, x: NDArray[np.float32]) -> NDArray[np.intp]:
        if len(self.ledgers) == 1:
            return np.zeros(len(x), np.intp)
        flat = x.reshape(len(x), -1)
        d = np.abs(flat[:, None, :] - self._centers[None, :, :]).max(axis=2)
        return np.asarray(d.argmin(axis=1), np.intp)

    def vector(self, ans: tuple[int, bool, str, float, float, float], y: int) -> NDArray[np.float32]:
        if self.mode == "decision":
            return decision_vector(ans[0], ans[1], y)
        return score_vector(margin(*ans, y=y), ans[0], y)

    def __call__(self, x: NDArray[np.floating]) -> NDArray[np.float32]:
        x = np.ascontiguousarray(x, np.float32).reshape(-1, 1, 28, 28)
        owners = self.owners(x)
        out = np.zeros((len(x), NB_CLASSES), np.float32)
        send: list[int] = []
        pending: dict[bytes, int] = {}  # the same new row twice in one call: sent once
        budget_hit = False
        for i, (row, o) in enumerate(zip(x, owners, strict=True)):
            L = self.ledgers[o]
            key = row.tobytes()
            if key in L.cache:
                out[i] = self.vector(L.cache[key], L.y)
            elif key in pending:
                continue
            elif L.left - sum(1 for j in send if owners[j] == o) <= 0:
                budget_hit = True
                out[i] = self.vector((L.y, True, "", 1.0, 0.0, 90.0), L.y)  # "true class": no information
            else:
                pending[key] = i
                send.append(i)
        if send:
            rows = x[send]
            if self.blind is not None:
                rows = np.stack([self.blind(x[i], self.ledgers[owners[i]].x0, self.ledgers[owners[i]].eps)
                                 for i in send])
            if self.gap_s > 0:
                wait = self._last_send + self.gap_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            ans = self.client.infer(rows)
            self._last_send = time.monotonic()
            for k, i in enumerate(send):
                L = self.ledgers[owners[i]]
                a = ans.row(k)
                with L.lock:
                    L.record(rows[k], a)
                    L.cache[x[i].tobytes()] = a
                    m = margin(*a, y=L.y)
                    if m < L.best_margin:
                        L.best_margin, L.best_row = m, x[i].copy()
            for i, o in enumerate(owners):
                if not out[i].any():
                    L = self.ledgers[o]
                    out[i] = self.vector(L.cache[x[i].tobytes()], L.y)
            if self.controller is not None:
                self.controller.update(float(ans.history.mean()))
            if self.on_sent is not None:
                self.on_sent()
            if self.stop_on_detection and ans.history.any():
                raise Detected()
        if (budget_hit and self.strict) or (not send and all(L.left <= 0 for L in self.ledgers)):
            raise BudgetExhausted()
        self._idle_calls = 0 if send else self._idle_calls + 1
        if self.strict and self._idle_calls >= STALL_CALLS:
            for L in self.ledgers:
                L.stalled = True
            raise Stalled()
        return out

    def submit(self, rows: NDArray[np.float32], owners: Sequence[int]) -> None:
        """Send rows unblinded (the attack's final candidates), each counted against its owner."""
        keep = [k for k, o in enumerate(owners) if self.ledgers[o].left > 0
                and (self.blind is not None or rows[k].tobytes() not in self.ledgers[o].cache)]
        if not keep:
            return
        ans = self.client.infer(rows[keep])
        for j, k in enumerate(keep):
            L = self.ledgers[owners[k]]
            L.record(rows[k], ans.row(j))
            L.cache[rows[k].tobytes()] = ans.row(j)
