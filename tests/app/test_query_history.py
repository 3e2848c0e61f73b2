"""The query-history detector (app/query_history.py, app/fingerprint.py, app/history_store.py):
its fingerprints, its store, and the service's answers with it (in-process store; the shared
Redis store: tests/app/test_query_history_redis.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from app.fingerprint import Fingerprinter, FingerprintParams
from app.history_store import MAX_TTL_S, LocalStore, best_match, pack, table_slots
from app.query_history import HistoryConfig, QueryHistory
from support.fake_store import CLASS_NAMES, NAME, prototype
from support.fashion_mnist import load_fashion_mnist_test, png_bytes
from support.query_streams import square_queries

SALT = b"a-test-salt-of-32-bytes-0123456"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fashion(n: int) -> np.ndarray:
    return load_fashion_mnist_test(n).astype(np.float32)[:, None] / 255


def test_fingerprints_are_keyed_by_the_salt_and_stable() -> None:
    x = fashion(4)
    a, b = Fingerprinter(SALT), Fingerprinter(SALT)
    other = Fingerprinter(b"another-salt-of-32-bytes-01234567")
    fa = a.fingerprints(x)
    assert fa.shape == (4, FingerprintParams().hashes) and fa.dtype == np.uint64
    np.testing.assert_array_equal(fa, b.fingerprints(x))  # deterministic for one salt
    assert not np.intersect1d(fa, other.fingerprints(x)).size  # another salt: other hashes
    assert np.all(np.diff(fa.astype(np.float64), axis=1) <= 0)  # descending
    assert a.digests(x[:1]) == b.digests(x[:1]) != other.digests(x[:1])
    with pytest.raises(ValueError, match="16 bytes"):
        Fingerprinter(b"short")


def test_a_blank_image_has_no_fingerprint_and_similar_images_share_hashes() -> None:
    f = Fingerprinter(SALT)
    blank = np.zeros((1, 1, 28, 28), np.float32)
    assert not f.fingerprints(blank).any()  # constant background is no evidence
    x = fashion(2)
    near = np.clip(x[:1] + 0.1 * (np.arange(784).reshape(1, 1, 28, 28) % 97 == 0), 0, 1)  # a few pixels moved
    fx, fo, fn = f.fingerprints(np.concatenate([x, near]))
    assert len(np.intersect1d(fx, fn)) >= 30  # most hashes kept
    assert len(np.intersect1d(fx, fo)) <= 5  # another image: few


def test_the_table_matches_one_earlier_query_and_forgets_after_the_ttl() -> None:
    h = np.sort(np.random.default_rng(0).integers(1, 2**63, 20, dtype=np.uint64))
    old = pack(h, 7, 1000)
    assert best_match(h, old, 1000, 60) == 20
    assert best_match(h, old, 1061, 60) == 0  # expired
    mixed = old.copy()
    mixed[:5] = pack(h[:5], 8, 1000)  # five hashes last seen in query 8: one query has 15
    assert best_match(h, mixed, 1000, 60) == 15
    assert best_match(h ^ np.uint64(1 << 63), old, 1000, 60) == 0  # other tags
    assert best_match(h, np.zeros(20, np.uint64), 1000, 60) == 0
    assert MAX_TTL_S >= 3 * 24 * 3600


def test_local_store_is_bounded_and_remembers_exact_repeats() -> None:
    async def run() -> None:
        store = LocalStore(slots=1 << 12, ttl_s=60, exact_capacity=3, threshold=15)
        fp = np.random.default_rng(1).integers(1, 2**63, (200, 50), dtype=np.uint64)
        for i, row in enumerate(fp):
            await store.record(row, i)
        used, nbytes = await store.size()
        assert nbytes == 8 * 4096 and used <= 4096  # never grows
        await store.remember([b"a", b"b", b"c", b"d"], [True, False, False, False])
        assert await store.repeated([b"a", b"b", b"d", b"e"]) == [None, False, False, None]  # "a" evicted

    asyncio.run(run())


def test_a_table_of_any_size_in_mb_matches_near_copies() -> None:
    """Sizes in MB are not powers of two: a hash goes to slot hash mod slots, every slot reachable."""
    async def run() -> None:
        slots = table_slots(0.0123)  # 1,537 slots
        assert slots == 1537
        store = LocalStore(slots=slots, ttl_s=60, exact_capacity=3, threshold=15)
        rng = np.random.default_rng(2)
        fp = rng.integers(1, 2**64, (20, 50), dtype=np.uint64)
        for i, row in enumerate(fp):
            await store.record(row, i)
        near = fp[7].copy()
        near[:20] = rng.integers(1, 2**64, 20, dtype=np.uint64)  # 30 of 50 hashes shared with query 7
        assert await store.record(near, 99) >= 15
        assert store.table.shape == (slots,) and (await store.size())[1] == 8 * slots

    asyncio.run(run())


def test_a_square_stream_is_detected_and_benign_images_are_not() -> None:
    async def run() -> None:
        h = QueryHistory(HistoryConfig(salt=SALT))
        await h.start()
        benign = await h.judge(fashion(2000))  # 2,000 different test images, one batch
        assert benign.checked and benign.attack.sum() <= 2
        stream = square_queries(fashion(2001)[2000], 30)
        flags = [bool((await h.judge(q[None])).attack[0]) for q in stream]
        assert flags.index(True) < 10 and sum(flags) >= 25

    asyncio.run(run())


def test_exact_repeats_are_no_evidence_and_keep_their_first_decision() -> None:
    async def run() -> None:
        h = QueryHistory(HistoryConfig(salt=SALT))
        await h.start()
        x = fashion(50)
        first = await h.judge(x)
        again = await h.judge(np.concatenate([x, x[:3]]))  # retries, and a repeat inside the batch
        assert not first.attack.any() and not first.repeat.any()
        assert again.repeat.all() and not again.attack.any()
        stream = square_queries(x[0], 20)
        flags = [bool((await h.judge(q[None])).attack[0]) for q in stream]
        flagged = stream[flags.index(True)]
        repeat = await h.judge(flagged[None])
        assert repeat.repeat[0] and repeat.attack[0]  # an attack query sent again stays one

    asyncio.run(run())


def test_off_judges_nothing() -> None:
    async def run() -> None:
        h = QueryHistory(HistoryConfig(action="off", salt=SALT))
        await h.start()
        j = await h.judge(np.stack(square_queries(fashion(1)[0], 10)))
        assert not j.checked and not j.attack.any()

    asyncio.run(run())


def _pngs(queries: list[np.ndarray]) -> list[bytes]:
    return [png_bytes(np.round(q[0] * 255).astype(np.uint8)) for q in queries]


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["reject", "flag"])
async def test_the_service_rejects_or_flags_attack_queries(make_client, action: str) -> None:
    """Through /classify: an attack stream (Square's queries on a prototype the fixture model
    accepts) is rejected with reason query_history, or only counted; the metrics say so."""
    base = prototype(3).astype(np.float32)[None] / 255
    pngs = _pngs(square_queries(base, 25, eps=0.05))
    async with make_client(query_history_action=action) as c:
        answers = [(await c.post("/classify", files={"file": ("q.png", p, "image/png")})).json() for p in pngs]
        metrics = (await c.get("/metrics")).text
        health = (await c.get("/healthz")).json()
        recent = (await c.get("/stats")).json()  # the page's live panel
    reasons = [a["reason"] for a in answers]
    assert health["query_history"] == {"action": action, "store": "memory", "status": "ok", "error": None}
    flagged = _metric(metrics, f'dsphere_query_history_attack_queries_total{{action="{action}"}}')
    assert flagged >= 20 and _metric(metrics, "dsphere_query_history_checked_total") == 25
    assert recent["attack_queries"] == flagged
    answered = [a for a in answers if a["reason"] != "query_history"]
    assert answered and all(a["label"] == 3 and a["class_name"] == CLASS_NAMES[3] for a in answered)
    if action == "reject":
        assert reasons[0] is None and reasons.count("query_history") == flagged
        # an attack query gets a rejection and nothing of the model's: no label, probability or angle
        model_outputs = ("label", "class_name", "probability", "angle_deg", "threshold_deg")
        assert all(a["verdict"] == "reject" and all(a[k] is None for k in model_outputs)
                   for a in answers if a["reason"] == "query_history")
    else:
        assert all(a["verdict"] == "accept" and a["reason"] is None for a in answers)
    assert _metric(metrics, 'dsphere_query_history_store_up{store="memory"}') == 1
    assert _metric(metrics, 'dsphere_query_history_store_bytes{store="memory"}') == 32e6  # the default table: 32 MB


@pytest.mark.anyio
async def test_no_route_gives_an_attack_query_the_models_answer(make_client, tmp_path: Path) -> None:
    """V2 (JSON and binary outputs: label -1, NaN / null), /explain (no top classes, no statistics) and
    /classify/batch withhold the model's outputs for an attack query; the quarantine keeps them."""
    base = prototype(3).astype(np.float32)[None] / 255
    stream = square_queries(base, 12, eps=0.05)
    outputs = [{"name": n} for n in ("label", "angle_deg", "accepted", "reason", "threshold_deg", "probability")]
    async with make_client(quarantine_dir=tmp_path / "q") as c:
        for q in stream[:-3]:  # the attack, through V2 JSON
            r = await c.post(f"/v2/models/{NAME}/infer", json={"inputs": [
                {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": q.ravel().tolist()}],
                "outputs": outputs})
            assert r.status_code == 200, r.text
        got = {o["name"]: o["data"][0] for o in r.json()["outputs"]}
        binary = await c.post(f"/v2/models/{NAME}/infer", json={"inputs": [
            {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": stream[-3].ravel().tolist()}],
            "outputs": [{"name": "probability", "parameters": {"binary_data": True}}]})
        explained = (await c.post("/explain", files={"file": ("q.png", _pngs(stream[-2:-1])[0], "image/png")})).json()
        batch = (await c.post("/classify/batch", files=[("files", ("q.png", p, "image/png"))
                                                        for p in _pngs([stream[-1], prototype(7)[None] / 255])])).json()
    assert got == {"label": -1, "angle_deg": None, "accepted": False, "reason": "query_history",
                   "threshold_deg": None, "probability": None}
    assert binary.status_code == 200 and np.isnan(np.frombuffer(binary.content[-8:], "<f8")).all()
    assert explained["reason"] == "query_history" and explained["top_classes"] == []
    assert explained["label"] is None and explained["angle_mean_deg"] is None and explained["input"]["pixels"]
    first, other = batch["results"]
    assert first["reason"] == "query_history" and first["label"] is None and first["probability"] is None
    assert other["reason"] is None and other["label"] == 7  # a benign image in the same request is answered
    kept = [json.loads(f.read_text()) for f in sorted((tmp_path / "q").rglob("*.json"))]
    assert kept and all(k["reason"] == "query_history" and k["label"] == 3 for k in kept)  # the operator sees it


@pytest.mark.anyio
async def test_retries_get_the_same_answer_from_the_result_cache(make_client) -> None:
    png = png_bytes(prototype(5))
    async with make_client() as c:
        answers = [(await c.post("/classify", files={"file": ("q.png", png, "image/png")})).json() for _ in range(5)]
        metrics = (await c.get("/metrics")).text
        svc = c.app.state.service  # type: ignore[attr-defined]
        batches = _metric(metrics, "dsphere_inference_batch_size_count")
    assert all({k: v for k, v in a.items() if k != "request_id"} == {k: v for k, v in answers[0].items()
                                                                     if k != "request_id"} for a in answers)
    assert answers[0]["verdict"] == "accept" and answers[0]["reason"] is None
    assert _metric(metrics, "dsphere_query_history_repeats_total") == 4
    assert _metric(metrics, "dsphere_query_history_attack_queries_total") == 0
    assert len(svc.results) == 1 and batches <= 2  # warm-up, then one inference: the retries hit the cache


@pytest.mark.anyio
async def test_the_angle_reason_and_batches(make_client) -> None:
    noise = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    files = [("files", ("a.png", png_bytes(prototype(1)), "image/png")), ("files", ("n.png", noise, "image/png"))]
    async with make_client() as c:
        r = await c.post("/classify/batch", files=files)
        e = await c.post("/explain", files={"file": ("n.png", noise, "image/png")})
    assert r.status_code == 200, r.text
    assert [x["reason"] for x in r.json()["results"]] == [None, "angle"]
    assert e.json()["reason"] == "angle"  # the same noise again: an exact repeat, same answer


def test_settings_refuse_a_short_salt_and_a_foreign_url() -> None:
    from app.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="QUERY_HISTORY_SALT"):
        load_settings(query_history_salt="short")
    with pytest.raises(SettingsError, match="QUERY_HISTORY_REDIS_URL"):
        load_settings(query_history_redis_url="http://example.com")
    assert load_settings(query_history_salt="").query_history_salt is None
    # a Redis string holds 512 MiB: 2^26 slots, 536 MB; in-process tables may be larger
    with pytest.raises(SettingsError, match="QUERY_HISTORY_TABLE_MB is at most 536 with Redis"):
        load_settings(query_history_redis_url="redis://localhost:6379/0", query_history_table_mb=537)
    assert load_settings(query_history_redis_url="redis://localhost:6379/0", query_history_table_mb=536)
    assert load_settings(query_history_table_mb=1024).query_history_table_mb == 1024


def _metric(text: str, name: str) -> float:
    """Sum of the samples of `name` (a full sample name with labels, or a name whose every
    label set is summed)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or (("{" not in name) and key.split("{")[0] == name):
            total += float(value)
    return total


def test_the_workers_of_a_host_share_one_history_through_a_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SharedStore: two detectors (two workers) mapping one directory share the salt, the table
    and the exact repeats; a third started later finds them."""
    async def run() -> None:
        a, b = (QueryHistory(HistoryConfig(shared_dir=tmp_path)) for _ in range(2))
        await a.start()
        await b.start()
        assert a.fingerprinter is not None and b.fingerprinter is not None
        x = fashion(3)
        assert a.fingerprinter.digests(x) == b.fingerprinter.digests(x)  # one salt, from the directory
        stream = square_queries(x[0], 20)
        flags = [bool((await (a if i % 2 else b).judge(q[None])).attack[0]) for i, q in enumerate(stream)]
        assert flags.index(True) < 10 and sum(flags) >= 15  # round-robin over the two: one history
        first = await a.judge(x[1:2])
        again = await b.judge(x[1:2])  # a retry through the other worker: an exact repeat
        assert not first.repeat[0] and again.repeat[0] and not again.attack[0]
        late = QueryHistory(HistoryConfig(shared_dir=tmp_path))
        await late.start()
        assert (await late.judge(stream[-1][None])).repeat[0]
        assert b.store_kind == "shared" and (await b.size())[1] == 32_000_000  # type: ignore[index]

    asyncio.run(run())
