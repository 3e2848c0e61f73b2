"""Query attacks against the live service, through its API only, with the query-history detector off and on (#26).

    python bench/attack_service.py [--images 50] [--queries 2000] [--attacks square,simba,...]
                                   [--settings off,on] [--out docs/results/query-history] [--report-only]

Each attack of the adversarial-robustness-toolbox (ART) runs against a real server on a loopback
port (support/server.py; the bundled store's default model) through `support/api_classifier.py`:
V2 JSON infer, many queries a request, seeing only what the API answers (label, probability,
angle, threshold, accepted, reason). Every row sent is one query; an image's budget is
`--queries` rows. Success: an answer accepted and wrong for a query within eps = 0.1 L-inf of the
clean test image. Detected: an answer with reason query_history; queries to detection is the
number of that query (1-based, per image).

Attacked images: the first `--images` test images the served model accepts with their true label
(chosen on a server with the detector off, so the choice leaves nothing in the history).
Decision-based attacks start from the accepted test image of another class nearest (L2) to the
attacked one among test images 9000-9499 (the attacker's own pool).

Attacks (ART 1.20, in bench order; the score/decision vectors: support/api_classifier.py):
  non-adaptive  square (SquareAttack L-inf, the rule in its loss), simba (SimBA, pixel basis, eps
                steps), hsj (HopSkipJump L-inf), boundary (BoundaryAttack), signopt (SignOPTAttack,
                targeted at the starting image's class)
  adaptive      square-blind (every query blinded: support.api_classifier.Blinder), square-oars (Square's
                step multiplied by an OARS-style controller fed the share of query_history answers),
                square-spread (requests round-robin over 16 source addresses 127.0.0.2-17, two workers
                sharing one real redis-server), square-slow (the server's ttl 1 s, one request every
                2.05 s), square-restart (Square restarted with a new random seed at every detection)
Settings: off (DSPHERE_QUERY_HISTORY_ACTION=off) and on (reject). Square-family attacks run a group
of images per ART call (one request carries a query of each); the others one image per ART call,
`--parallel` images at once.

Results: `<out>/attacks/<attack>-<setting>-n<images>-q<queries>.json`, rewritten after every image
or group; a run interrupted is continued from it (the images it holds are not attacked again;
a group in progress is). `<out>/table.md` and the block between the markers of `<out>/README.md`
are made from every run file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from support.api_classifier import (
    EPS,
    NB_CLASSES,
    ApiClient,
    ApiPredict,
    Blinder,
    BudgetExhausted,
    Detected,
    Ledger,
    StepController,
)
from support.bundled import REPO
from support.fashion_mnist import load_fashion_mnist_test, load_fashion_mnist_test_labels
from support.server import start_server

OUT = REPO / "docs" / "results" / "query-history"
NON_ADAPTIVE = ["square", "simba", "hsj", "boundary", "signopt"]
ADAPTIVE = ["square-blind", "square-oars", "square-spread", "square-restart", "square-slow"]
POOL = range(9000, 9500)
SLOW_TTL_S, SLOW_GAP_S = 1.0, 2.05
SPREAD_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 18)]
BEGIN, END = "<!-- attack-table:begin -->", "<!-- attack-table:end -->"


@dataclass(frozen=True)
class Target:
    index: int
    y: int
    x0: np.ndarray  # [1, 28, 28]
    init: np.ndarray | None = None  # starting image of decision-based attacks
    init_label: int | None = None


# ---------------------------------------------------------------- servers

@contextmanager
def served(attack: str, setting: str, model: str | None, version: str | None = None
           ) -> Iterator[tuple[ApiClient, str]]:
    """A fresh server (fresh history) for one attack and setting, and a client for it."""
    env = {"DSPHERE_QUERY_HISTORY_ACTION": "off" if setting == "off" else "reject"}
    if model:
        env["DSPHERE_MODEL_NAME"] = model
    if version:
        env["DSPHERE_MODEL_VERSION"] = version
    workers, addresses = 1, [None]
    with ExitStack() as stack:
        if attack == "square-spread":
            workers, addresses = 2, list(SPREAD_ADDRESSES)
            if setting == "on":
                from support.redis_server import start_redis
                redis = stack.enter_context(start_redis())
                env["DSPHERE_QUERY_HISTORY_REDIS_URL"] = redis.url
        if attack == "square-slow" and setting == "on":
            env["DSPHERE_QUERY_HISTORY_TTL_S"] = str(SLOW_TTL_S)
        log = Path(tempfile.mkstemp(prefix=f"attack-{attack}-{setting}-", suffix=".log")[1])
        server = stack.enter_context(start_server(env, workers=workers, log_path=log, timeout=180))
        name = model or server.env["DSPHERE_MODEL_NAME"]
        client = ApiClient(server.url, name, addresses)
        stack.callback(client.close)
        meta = client.clients[0].get(f"/v2/models/{name}").json()
        yield client, f"{name} {meta['versions'][-1] if meta.get('versions') else ''}".strip()


def choose_targets(n: int, model: str | None, version: str | None = None) -> tuple[list[Target], str]:
    need = max(n * 2 + 20, 60)
    x = load_fashion_mnist_test(10_000).astype(np.float32)[:, None] / 255.0
    ys = load_fashion_mnist_test_labels(10_000).astype(int)
    with served("select", "off", model, version) as (client, served_model):
        a = client.infer(x[:need])
        chosen = [i for i in range(need) if a.accepted[i] and a.label[i] == ys[i]][:n]
        if len(chosen) < n:
            raise SystemExit(f"only {len(chosen)} of the first {need} test images are accepted and correct")
        pool = np.array(list(POOL))
        pa = client.infer(x[pool])
    good = pool[pa.accepted & (pa.label == ys[pool])]
    targets = []
    for i in chosen:
        cand = good[ys[good] != ys[i]]
        j = int(cand[np.argmin(np.linalg.norm((x[cand] - x[i]).reshape(len(cand), -1), axis=1))])
        targets.append(Target(i, int(ys[i]), x[i], x[j], int(ys[j])))
    return targets, served_model


# ---------------------------------------------------------------- attacks

def _classifier(predict: ApiPredict) -> Any:
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork
    return BlackBoxClassifierNeuralNetwork(predict, input_shape=(1, 28, 28), nb_classes=NB_CLASSES,
                                           channels_first=True, clip_values=(0.0, 1.0))


def _onehot(ys: list[int]) -> np.ndarray:
    return np.eye(NB_CLASSES, dtype=np.float32)[ys]


def _square(predict: ApiPredict, ledgers: list[Ledger], controller: StepController | None = None) -> None:
    from art.attacks.evasion import SquareAttack

    class OarsSquare(SquareAttack):
        def _get_percentage_of_elements(self, i_iter: int) -> float:
            p = super()._get_percentage_of_elements(i_iter)
            return min(0.9, p * controller.scale) if controller is not None else p

    budget = min(L.left for L in ledgers)
    if budget < 3:
        return
    attack = OarsSquare(_classifier(predict), norm=np.inf, eps=EPS, max_iter=2 * budget, p_init=0.05,
                        nb_restarts=1, batch_size=64, verbose=False)
    x = np.stack([L.x0 for L in ledgers])
    try:
        attack.generate(x, _onehot([L.y for L in ledgers]))
    except BudgetExhausted:
        pass


def run_group(attack: str, setting: str, client: ApiClient, ledgers: list[Ledger], seed: int) -> None:
    """Square and its adaptive forms on a group of images at once."""
    np.random.seed(seed)
    rng = np.random.default_rng(seed)
    on = setting == "on"
    if attack == "square-blind":
        predict = ApiPredict(client, ledgers, blind=Blinder(rng))
        _square(predict, ledgers)
        # the attack's best rows as they are (never sent unblinded before), one query each
        best = [(k, L.best_row) for k, L in enumerate(ledgers) if L.best_row is not None]
        if best:
            predict.submit(np.stack([r for _, r in best]), [k for k, _ in best])
    elif attack == "square-oars":
        controller = StepController()
        _square(ApiPredict(client, ledgers, controller=controller), ledgers, controller)
    elif attack == "square-slow":
        # detector off: the history is not there, so waiting changes nothing; the run does not wait
        _square(ApiPredict(client, ledgers, gap_s=SLOW_GAP_S if on else 0.0), ledgers)
    else:  # square, square-spread (the spreading is the client's and server's)
        _square(ApiPredict(client, ledgers), ledgers)


def run_one(attack: str, setting: str, client: ApiClient, t: Target, L: Ledger, seed: int) -> dict[str, Any]:
    """The per-image attacks; returns extra fields for the image's record."""
    from art.attacks.evasion import BoundaryAttack, HopSkipJump, SignOPTAttack, SimBA, SquareAttack

    np.random.seed(seed)
    x, y1 = t.x0[None], _onehot([t.y])
    extra: dict[str, Any] = {}
    if attack == "square-restart":
        restarts = 0
        while L.left >= 3 and L.success_at is None:
            before = L.sent
            np.random.seed(seed + 7919 * (restarts + 1))
            predict = ApiPredict(client, [L], strict=True, stop_on_detection=True)
            sq = SquareAttack(_classifier(predict), norm=np.inf, eps=EPS, max_iter=2 * L.left, p_init=0.05,
                              nb_restarts=1, batch_size=64, verbose=False)
            try:
                sq.generate(x, y1)
            except Detected:
                restarts += 1
                continue
            except BudgetExhausted:
                break
            if L.sent == before:
                break
        extra["restarts"] = restarts
        return extra
    mode = "scores" if attack == "simba" else "decision"
    predict = ApiPredict(client, [L], mode=mode, strict=True)
    clf = _classifier(predict)
    try:
        if attack == "simba":
            SimBA(clf, attack="px", max_iter=max(1, (L.budget - 1) // 2), epsilon=EPS, order="random",
                  freq_dim=4, stride=1, targeted=False, batch_size=1, verbose=False).generate(x, y1)
        elif attack == "hsj":
            HopSkipJump(clf, batch_size=64, targeted=False, norm=np.inf, max_iter=1000, max_eval=1000, init_eval=50,
                        init_size=20, verbose=False).generate(x, y1, x_adv_init=t.init[None])
        elif attack == "boundary":
            BoundaryAttack(clf, batch_size=64, targeted=False, delta=0.01, epsilon=0.01, max_iter=100_000,
                           num_trial=10, sample_size=10, init_size=20, verbose=False).generate(
                x, y1, x_adv_init=t.init[None])
        elif attack == "signopt":
            so = SignOPTAttack(clf, targeted=True, epsilon=0.001, num_trial=10, max_iter=100_000,
                               query_limit=L.budget, k=50, batch_size=64, verbose=False)
            so.clip_min, so.clip_max = 0.0, 1.0
            so.generate(x, _onehot([t.init_label]), x_init=t.init[None])
            extra["target"] = t.init_label
        else:
            raise ValueError(attack)
    except BudgetExhausted:
        pass
    return extra


# ---------------------------------------------------------------- runs and files

def run_path(out: Path, attack: str, setting: str, n: int, q: int) -> Path:
    return out / "attacks" / f"{attack}-{setting}-n{n}-q{q}.json"


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    det = [r["queries_to_detection"] for r in records if r["detected"]]
    l2 = [r["best_adv_l2"] for r in records if r["best_adv_l2"] is not None]
    return {
        "images": n,
        "successes": sum(r["success"] for r in records),
        "success_rate": round(sum(r["success"] for r in records) / n, 4) if n else None,
        "queries_mean": round(statistics.mean(r["queries"] for r in records), 1) if n else None,
        "queries_total": sum(r["queries"] for r in records),
        "detected_runs": len(det),
        "detection_median": statistics.median(det) if det else None,
        "detection_worst": max(det) if det else None,
        "detected_at_first_query": sum(1 for d in det if d == 1),
        "adv_l2_median": round(statistics.median(l2), 4) if l2 else None,
        "adv_l2_found": len(l2),
        "stalled": sum(1 for r in records if r.get("stalled")),
    }


def run_attack(attack: str, setting: str, targets: list[Target], served_model: str, args: argparse.Namespace) -> None:
    path = run_path(args.out, attack, setting, len(targets), args.queries)
    config = {"attack": attack, "setting": setting, "images": len(targets), "queries_per_image": args.queries,
              "eps": EPS, "model": served_model, "seed": args.seed,
              "detector": "off" if setting == "off" else "reject"}
    old = json.loads(path.read_text()) if path.exists() else None
    records: dict[int, dict[str, Any]] = {}
    if old is not None:
        if old["config"] != config:
            raise SystemExit(f"{path}: made with another configuration ({old['config']}); move it away first")
        records = {r["index"]: r for r in old["records"]}
    todo = [t for t in targets if t.index not in records]
    if not todo:
        print(f"{attack:15s} {setting:3s}: complete ({len(records)} images)", flush=True)
        return
    lock = threading.Lock()
    started = old["started"] if old else time.strftime("%Y-%m-%dT%H:%M:%S")
    wall0 = old.get("wall_s", 0.0) if old else 0.0
    t0 = time.monotonic()

    sessions: list[dict[str, Any]] = old.get("sessions", []) if old else []
    sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "app": _app_version(), "detector_health": None})

    def save() -> None:
        recs = [records[t.index] for t in targets if t.index in records]
        _write(path, {"config": config, "started": started, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "complete": len(recs) == len(targets), "wall_s": round(wall0 + time.monotonic() - t0, 1),
                      "sessions": sessions, "summary": summarize(recs), "records": recs})

    def done(t: Target, L: Ledger, extra: dict[str, Any], seconds: float) -> None:
        with lock:
            records[t.index] = {**L.result(), **extra, "wall_s": round(seconds, 2)}
            save()

    print(f"{attack:15s} {setting:3s}: {len(todo)} of {len(targets)} images to attack, {args.queries} queries each",
          flush=True)
    with served(attack, setting, args.model, args.version) as (client, _):
        if attack.startswith("square") and attack != "square-restart":
            # the slowed attack waits 2 s a request: more images a request (25) keep its wall time near 2 h
            size = max(args.group, 25) if attack == "square-slow" and setting == "on" else args.group
            for g in range(0, len(todo), size):
                group = todo[g: g + size]
                ledgers = [Ledger(t.index, t.x0, t.y, args.queries) for t in group]
                s = time.monotonic()
                run_group(attack, setting, client, ledgers, args.seed + group[0].index)
                for t, L in zip(group, ledgers, strict=True):
                    done(t, L, {}, (time.monotonic() - s) / len(group))
                _progress(attack, setting, records, len(targets))
        else:
            def one(t: Target) -> None:
                L = Ledger(t.index, t.x0, t.y, args.queries)
                s = time.monotonic()
                try:
                    extra = run_one(attack, setting, client, t, L, args.seed + t.index)
                except Exception:  # an attack's own failure is recorded, not hidden
                    extra = {"error": traceback.format_exc(limit=3)[-600:]}
                done(t, L, extra, time.monotonic() - s)
                _progress(attack, setting, records, len(targets))

            with ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(one, todo))
        # what the detector said of itself at the end (e.g. a store that could not be used)
        sessions[-1]["detector_health"] = client.clients[0].get("/healthz").json().get("query_history")
        with lock:
            save()


def _app_version() -> str:
    """The last commit of app/ (the detector measured), "+dirty:<sha1 of `git diff HEAD -- app`>" when app/ has
    uncommitted changes."""
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h", "--", "app"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "HEAD", "--", "app"], cwd=REPO, capture_output=True,
                               timeout=10).stdout
        return head + (f"+dirty:{hashlib.sha1(dirty).hexdigest()[:8]}" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _progress(attack: str, setting: str, records: dict[int, dict[str, Any]], n: int) -> None:
    s = summarize(list(records.values()))
    print(f"  {attack} {setting}: {s['images']}/{n} images, success {s['successes']}, detected {s['detected_runs']}, "
          f"median detection {s['detection_median']}, queries {s['queries_total']}", flush=True)


# ---------------------------------------------------------------- report

def _fmt_det(s: dict[str, Any]) -> str:
    if s["detection_median"] is None:
        return "none"
    return f"{s['detected_runs']}/{s['images']} runs; median {s['detection_median']:g}, worst {s['detection_worst']}"


def table(out: Path) -> str:
    runs: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for p in sorted((out / "attacks").glob("*.json")):
        d = json.loads(p.read_text())
        c = d["config"]
        runs.setdefault((c["attack"], c["images"], c["queries_per_image"]), {})[c["setting"]] = d
    order = {a: i for i, a in enumerate(NON_ADAPTIVE + ADAPTIVE)}
    lines = ["| attack | images x queries | off: success | on: success | on: queries / image (mean) "
             "| on: detected, queries to first detection | off: adv. L2 median (found) | state |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (attack, n, q), by in sorted(runs.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][2])):
        off, on = by.get("off"), by.get("on")

        def cell(d: dict[str, Any] | None) -> str:
            if d is None:
                return "not run"
            s = d["summary"]
            return f"{s['successes']}/{s['images']} ({100 * s['success_rate']:.0f} %)" if s["images"] else "-"

        state = "complete" if all(d is not None and d["complete"] for d in (off, on)) else "partial"
        l2 = "-"
        if off is not None and attack in ("hsj", "boundary", "signopt") and off["summary"]["adv_l2_median"] is not None:
            l2 = f"{off['summary']['adv_l2_median']:.2f} ({off['summary']['adv_l2_found']})"
        lines.append(f"| {attack} | {n} x {q} | {cell(off)} | {cell(on)} | "
                     f"{on['summary']['queries_mean'] if on else '-'} | {_fmt_det(on['summary']) if on else '-'} | "
                     f"{l2} | {state} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> None:
    text = table(out)
    (out / "table.md").write_text("# Query attacks through the API: the generated table\n\n"
                                  "Made by `bench/attack_service.py` from attacks/*.json; see README.md.\n\n" + text)
    readme = out / "README.md"
    if readme.exists():
        doc = readme.read_text()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            readme.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--queries", type=int, default=2000, help="query budget per image (rows sent)")
    ap.add_argument("--attacks", default=",".join(NON_ADAPTIVE + ADAPTIVE))
    ap.add_argument("--settings", default="off,on")
    ap.add_argument("--model", default="fashion-mnist-dsphere",
                    help="DSPHERE_MODEL_NAME (the published runs attack the D-SphereNet)")
    ap.add_argument("--version", default="3.1.0",
                    help="DSPHERE_MODEL_VERSION (the published runs': 3.1.0; empty: the latest)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--group", type=int, default=10, help="images per Square call (one request a query of each)")
    ap.add_argument("--parallel", type=int, default=6, help="images attacked at once by the per-image attacks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in attacks if a not in NON_ADAPTIVE + ADAPTIVE]
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; known: {NON_ADAPTIVE + ADAPTIVE}")
    if not args.report_only:
        targets, served_model = choose_targets(args.images, args.model, args.version)
        print(f"model {served_model}: attacking test images {[t.index for t in targets]}", flush=True)
        for attack in attacks:
            for setting in args.settings.split(","):
                run_attack(attack, setting, targets, served_model, args)
                write_report(args.out)
    write_report(args.out)
    print(table(args.out))


if __name__ == "__main__":
    main(sys.argv[1:])
