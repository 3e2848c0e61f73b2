"""The query history in a real Redis (support/redis_server.py: Debian's redis-server on a free
loopback port, nothing persisted): two app instances pointed at one Redis share one history and
one salt, and the service goes on answering when Redis goes away and comes back (#26).

The two instances are two apps in this process (tests/app/conftest.py's make_client, the
fixture model), each with its own Redis connection: what two workers or two replicas are.
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from support.fake_store import prototype
from support.query_streams import square_queries as square_stream
from support.redis_server import RedisHandle, redis_available, start_redis

pytestmark = pytest.mark.skipif(not redis_available(),
                                reason="redis-server not installed (apt-get install redis-server)")

SALT_KEY = "dsphere:qh:salt"
RETRY_S = 5.0  # HistoryConfig.retry_s: how long the detector stands aside after a store error


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_server() -> Any:
    with start_redis() as r:
        yield r


def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(x[0] * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def square_queries(x: np.ndarray, n: int, eps: float = 0.05, seed: int = 0) -> list[bytes]:
    """A Square-like stream on x ([1, 28, 28] in [0, 1]), as PNGs."""
    return [_png(q) for q in square_stream(x, n, eps, seed)]


async def classify(c: httpx.AsyncClient, png: bytes) -> dict[str, Any]:
    r = await c.post("/classify", files={"file": ("q.png", png, "image/png")})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def metric(text: str, name: str) -> float:
    """Sum of the samples of `name` (a full sample name with labels, or every label set of a name)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or ("{" not in name and key.split("{")[0] == name):
            total += float(value)
    return total


def _redis_client(r: RedisHandle) -> Any:
    import redis

    return redis.Redis.from_url(r.url)


@pytest.mark.anyio
async def test_two_instances_on_one_redis_see_one_history(make_client, redis_server: RedisHandle) -> None:
    """A near-duplicate stream sent alternately to two instances: the second one flags queries
    it never saw before, from the history the first one wrote; two instances without Redis
    (each its own memory) do not."""
    base = prototype(3).astype(np.float32)[None] / 255
    stream = square_queries(base, 24)
    async with make_client(query_history_redis_url=redis_server.url) as a, \
            make_client(query_history_redis_url=redis_server.url) as b:
        answers = [await classify((a, b)[i % 2], q) for i, q in enumerate(stream)]
        health = [(await c.get("/healthz")).json()["query_history"] for c in (a, b)]
        texts = [(await c.get("/metrics")).text for c in (a, b)]
    assert health == [{"action": "reject", "store": "redis", "status": "ok", "error": None}] * 2
    reasons = [x["reason"] for x in answers]
    on_b = reasons[1::2]
    assert reasons[0] is None  # the first query: nothing to match yet
    assert reasons[1] == "query_history", reasons  # B's first query matches A's: one history
    assert on_b.count("query_history") >= 10 and reasons.count("query_history") >= 20, reasons
    assert all(x["label"] is None and x["verdict"] == "reject" for x in answers if x["reason"] == "query_history")
    for text in texts:  # each instance judged its half, against the shared table
        assert metric(text, "dsphere_query_history_checked_total") == 12
        assert metric(text, 'dsphere_query_history_store_up{store="redis"}') == 1
        assert metric(text, "dsphere_query_history_store_errors_total") == 0
    assert metric(texts[1], "dsphere_query_history_attack_queries_total") >= 10
    assert metric(texts[1], 'dsphere_query_history_store_bytes{store="redis"}') > 0

    # the contrast: the same two first queries, each instance with its own memory
    async with make_client() as a, make_client() as b:
        first, second = await classify(a, stream[0]), await classify(b, stream[1])
    assert first["reason"] is None and second["reason"] is None


@pytest.mark.anyio
async def test_the_salt_is_shared_through_redis_when_unset(make_client, redis_server: RedisHandle) -> None:
    """With no salt set, the first instance's random salt is kept in Redis and every other one
    uses it: an exact repeat sent to another instance is known there (its keyed digest is the
    same); a salt set in the settings is used as it is and does not replace the shared one."""
    png = _png(prototype(5).astype(np.float32)[None] / 255)
    async with make_client(query_history_redis_url=redis_server.url) as a:
        stored = _redis_client(redis_server).get(SALT_KEY)
        assert stored is not None and len(stored) >= 16
        async with make_client(query_history_redis_url=redis_server.url) as b:
            first, again = await classify(a, png), await classify(b, png)
            text_b = (await b.get("/metrics")).text
        async with make_client(query_history_redis_url=redis_server.url,
                               query_history_salt="an-explicit-salt-0123456789") as own:
            mine = await classify(own, png)
            text_own = (await own.get("/metrics")).text
    assert {k: v for k, v in first.items() if k != "request_id"} == \
        {k: v for k, v in again.items() if k != "request_id"}
    assert first["verdict"] == "accept" and first["reason"] is None
    assert metric(text_b, "dsphere_query_history_repeats_total") == 1  # B knew A's input: the same digest
    assert metric(text_own, "dsphere_query_history_repeats_total") == 0  # another salt: another digest
    assert mine["reason"] is None
    assert _redis_client(redis_server).get(SALT_KEY) == stored  # set once, never replaced


@pytest.mark.anyio
async def test_redis_stopped_mid_run_then_back(make_client, redis_server: RedisHandle) -> None:
    """Redis goes away: every request is still answered 200 with the per-input verdict, /healthz
    says query_history "unavailable", dsphere_query_history_store_up is 0 and the store errors
    are counted; Redis back (same port, empty): after retry_s the detector judges again (ok)."""
    imgs = [_png(prototype(k % 10).astype(np.float32)[None] / 255) for k in range(10)]
    noise = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    noisy = [_png(n[None].astype(np.float32) / 255) for n in noise]
    async with make_client(query_history_redis_url=redis_server.url) as c:
        before = [await classify(c, p) for p in imgs[:3]]
        assert (await c.get("/healthz")).json()["query_history"]["status"] == "ok"

        redis_server.stop()
        t0 = time.monotonic()
        down = [await classify(c, p) for p in imgs[3:]] + [await classify(c, p) for p in noisy]
        elapsed = time.monotonic() - t0
        health = (await c.get("/healthz")).json()
        text = (await c.get("/metrics")).text
        assert health["status"] != "down" and health["query_history"]["status"] == "unavailable", health
        assert health["query_history"]["store"] == "redis" and health["query_history"]["error"]
        assert metric(text, 'dsphere_query_history_store_up{store="redis"}') == 0
        assert metric(text, "dsphere_query_history_store_errors_total") > 0
        # the per-input verdict alone: prototypes accepted, noise rejected by its angle
        assert [(x["label"], x["verdict"], x["reason"]) for x in down[:7]] == \
            [(k, "accept", None) for k in range(3, 10)]
        assert all(x["verdict"] == "reject" and x["reason"] == "angle" for x in down[7:])
        assert elapsed < 10, f"{len(down)} requests took {elapsed:.1f} s with Redis down"

        redis_server.start()
        await asyncio.sleep(RETRY_S + 0.2)
        deadline, status = time.monotonic() + 20, None
        k = 0
        while time.monotonic() < deadline:
            answer = await classify(c, _png(np.clip(prototype(k % 10).astype(np.float32)[None] / 255
                                                    + 0.001 * k, 0, 1)))
            k += 1
            status = (await c.get("/healthz")).json()["query_history"]["status"]
            if status == "ok":
                break
            await asyncio.sleep(0.5)
        text = (await c.get("/metrics")).text
    assert status == "ok", "the detector did not judge again once Redis was back"
    assert answer["verdict"] in ("accept", "reject")
    assert metric(text, 'dsphere_query_history_store_up{store="redis"}') == 1
    assert [x["verdict"] for x in before] == ["accept"] * 3


def test_two_server_processes_on_one_redis_see_one_history(tmp_path: Any, redis_server: RedisHandle) -> None:
    """The same with two real service processes (support/server.py, the bundled model), as two
    replicas behind a load balancer: a Square-like stream on a test image, its first 10 queries
    sent to the first one, then alternately to both: the second one flags its very first query
    (it matches the first one's history), and both say store redis, status ok."""
    from support.fashion_mnist import load_fashion_mnist_test
    from support.server import start_server

    base = load_fashion_mnist_test(1).astype(np.float32)[:1] / 255
    stream = square_queries(base, 30, eps=0.1, seed=1)
    env = {"DSPHERE_QUERY_HISTORY_REDIS_URL": redis_server.url}
    with start_server(env, log_path=tmp_path / "a.log") as a, start_server(env, log_path=tmp_path / "b.log") as b, \
            a.client() as ca, b.client() as cb:
        reasons = []
        for i, q in enumerate(stream):
            r = (ca if i < 10 else (ca, cb)[i % 2]).post("/classify", files={"file": ("q.png", q, "image/png")})
            assert r.status_code == 200, r.text
            reasons.append(r.json()["reason"])
        health = [c.get("/healthz").json()["query_history"] for c in (ca, cb)]
    assert [(h["store"], h["status"]) for h in health] == [("redis", "ok")] * 2
    assert "query_history" in reasons[:10], reasons  # the first one alone sees the attack
    assert reasons[11] == "query_history", reasons  # the second one's first query: one history
    assert reasons[11::2].count("query_history") >= 7, reasons


def test_after_a_redis_restart_every_process_fingerprints_with_one_salt(redis_server: RedisHandle) -> None:
    """Redis restarted empty: a process that comes back publishes its salt again, and one that
    started meanwhile with a new salt is followed by the old one (the history is empty anyway)."""
    async def run() -> None:
        from app.query_history import HistoryConfig, QueryHistory

        cfg = HistoryConfig(redis_url=redis_server.url, retry_s=0.0)
        old = QueryHistory(cfg)
        await old.start()
        x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
        assert (await old.judge(x)).checked
        redis_server.stop()
        assert not (await old.judge(x)).checked  # unreachable: per-input verdict only
        redis_server.start()
        new = QueryHistory(cfg)  # started on the empty Redis: publishes its own salt
        await new.start()
        assert old.fingerprinter is not None and new.fingerprinter is not None
        assert old.fingerprinter.salt != new.fingerprinter.salt
        assert (await old.judge(x[:, :, ::-1])).checked  # back: takes the published salt
        assert old.fingerprinter.salt == new.fingerprinter.salt
        assert (await new.judge(x)).repeat[0] is np.False_
        assert (await old.judge(x)).repeat[0]  # one history again
        await old.close()
        await new.close()

    asyncio.run(run())


def test_redis_judges_batches_as_the_in_process_store_does(redis_server: RedisHandle) -> None:
    """Batches with an input twice, exact repeats of benign and of attack queries, and an attack
    stream: Redis's one transaction a request gives the in-process store's judgements, row by row."""
    from app.query_history import HistoryConfig, QueryHistory

    salt = b"0123456789abcdef-redis-batches"
    benign = np.stack([prototype(k) for k in range(6)]).astype(np.float32)[:, None] / 255
    stream = np.stack(square_stream(prototype(3).astype(np.float32)[None] / 255, 16, 0.05))
    batches = [
        np.concatenate([benign[:5], benign[:1]]),  # image 0 twice in one request
        np.concatenate([benign[1:2], stream[:8]]),  # image 1 again: an exact repeat; then an attack
        np.concatenate([stream[8:], stream[5:6], benign[5:6]]),  # a flagged query again; a new benign image
    ]

    async def judge_all(cfg: HistoryConfig) -> list[tuple[list[bool], list[bool]]]:
        h = QueryHistory(cfg)
        await h.start()
        out = []
        for b in batches:
            j = await h.judge(b)
            assert j.checked
            out.append((j.attack.tolist(), j.repeat.tolist()))
        await h.close()
        return out

    local = asyncio.run(judge_all(HistoryConfig(salt=salt)))
    shared = asyncio.run(judge_all(HistoryConfig(salt=salt, redis_url=redis_server.url)))
    assert shared == local
    (a1, r1), (a2, r2), (a3, r3) = local
    assert r1 == [False] * 5 + [True] and not any(a1)
    assert r2[0] and not a2[0] and sum(a2[1:]) >= 5  # the stream is caught within the request
    assert r3[-2] and a3[-2] == a2[6] and a3[-2]  # the flagged query again: still an attack query
    assert not r3[-1] and not a3[-1]


def test_requests_waiting_together_share_one_round_trip_and_are_judged_as_in_order(redis_server: RedisHandle) -> None:
    """Requests that arrive while a check is on its way go to Redis together in the next script
    (one round trip for many, under load), judged as one after another: a stream of near-copies,
    distinct benign images and one image sent twice (the second must be its exact repeat, not the
    near-copy of an input judged in the same script). The in-process store, one request at a time,
    is the reference."""
    from app.query_history import HistoryConfig, QueryHistory

    salt = b"0123456789abcdef-redis-together"
    benign = [prototype(k).astype(np.float32)[None, None] / 255 for k in range(10)]
    stream = [q[None] for q in square_stream(prototype(3).astype(np.float32)[None] / 255, 20, 0.05)]
    requests = benign[:6] + stream[:10] + [benign[2]] + stream[10:] + benign[6:]

    async def one_at_a_time() -> list[tuple[bool, bool]]:
        h = QueryHistory(HistoryConfig(salt=salt))
        await h.start()
        out = [(bool(j.attack[0]), bool(j.repeat[0])) for j in [await h.judge(x) for x in requests]]
        await h.close()
        return out

    async def all_at_once() -> tuple[list[tuple[bool, bool]], int]:
        h = QueryHistory(HistoryConfig(salt=salt, redis_url=redis_server.url))
        await h.start()
        store: Any = h.store
        script, calls = store._check, []

        async def counted(**kw: Any) -> Any:
            calls.append(len(kw["keys"]) - 1)
            return await script(**kw)

        store._check = counted
        judged = await asyncio.gather(*(h.judge(x) for x in requests))
        await h.close()
        assert all(j.checked for j in judged)
        return [(bool(j.attack[0]), bool(j.repeat[0])) for j in judged], len(calls)

    local = asyncio.run(one_at_a_time())
    shared, round_trips = asyncio.run(all_at_once())
    assert shared == local
    assert local[16] == (False, True)  # benign[2] again: an exact repeat
    assert sum(a for a, _ in local[6:16]) >= 5  # the stream is caught
    assert round_trips <= 3 < len(requests)  # 36 requests: split at the repeated input (and a second that ends)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["redis", "shared", "memory"])
async def test_copies_of_an_attack_query_sent_at_once_get_no_answer(make_client, redis_server: RedisHandle,
                                                                    tmp_path: Any, kind: str) -> None:
    """An attack query sent several times at once (the copies wait while the first is judged): the
    first is an attack query, and the copies are its exact repeats, each with the first's decision,
    never a repeat answered with the model's outputs while the first's decision is on its way."""
    where = {"redis": {"query_history_redis_url": redis_server.url},
             "shared": {"query_history_shared_dir": tmp_path / "qh"}, "memory": {}}[kind]
    stream = square_queries(prototype(3).astype(np.float32)[None] / 255, 16)
    async with make_client(**where) as c:
        before = [await classify(c, q) for q in stream[:-1]]
        copies = await asyncio.gather(*(classify(c, stream[-1]) for _ in range(4)))
        metrics = (await c.get("/metrics")).text
    assert [b["reason"] for b in before].count("query_history") >= 10  # the stream is an attack by now
    assert all(x["reason"] == "query_history" and x["label"] is None and x["probability"] is None
               for x in copies), copies
    assert metric(metrics, "dsphere_query_history_repeats_total") >= 3
