"""Schema fuzzing: schemathesis against the service's own /openapi.json, served by a REAL uvicorn.

Every operation of the OpenAPI document gets generated requests (valid and invalid: the
examples, coverage and fuzzing phases), each checked by schemathesis' default checks: no 5xx,
a documented status code, a documented content type, a body matching the documented schema,
documented headers, and invalid data rejected with a 4xx. /admin/reload is included, with the
bearer token (DSPHERE_ADMIN_TOKEN) sent on every request.

The document is built from the app at import (pytest parametrizes at collection, before any
server runs; schemathesis' lazy `from_fixture` loader does not work with pytest 9), and the
first test asserts it equals the /openapi.json the real server serves.

The last test checks what the fuzzing test sent. It runs after it in this module; run on its
own (a -k selection, --lf, another order), it runs both in a pytest subprocess instead.

DSPHERE_FUZZ_EXAMPLES (default 25) is the fuzzing-phase budget per operation; the default gives
a few hundred requests in all. `DSPHERE_FUZZ_EXAMPLES=150 pytest tests/reliability/test_schemathesis.py`
is the long run (over 1000 requests), see docs/RELIABILITY.md. DSPHERE_FUZZ_SEED changes the seed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import load_settings
from support.bundled import MODEL_NAME, REPO
from support.server import ServerHandle
from tests.reliability.conftest import ADMIN_TOKEN

EXAMPLES = int(os.environ.get("DSPHERE_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("DSPHERE_FUZZ_SEED", "7"))
INFER = "/v2/models/{name}/infer"
# The budget must really be spent: about 9 requests per example and operation were measured
# (13 operations; the 6 without inputs saturate at 10), so 25 -> over 400, 150 -> over 1300.
MIN_REQUESTS = 8 * EXAMPLES


@dataclass
class Tally:
    """What the fuzzing test sent: responses by operation and status."""

    by_operation: dict[str, Counter[int]] = field(default_factory=dict)

    def add(self, operation: str, status: int) -> None:
        self.by_operation.setdefault(operation, Counter())[status] += 1

    @property
    def statuses(self) -> Counter[int]:
        return sum(self.by_operation.values(), Counter())

    @property
    def cases(self) -> int:
        return sum(self.statuses.values())


TALLY = Tally()


def requests_served(srv: ServerHandle) -> float:
    """Sum of dsphere_requests_total: every request the server answered (any endpoint)."""
    with srv.client() as c:
        text = c.get("/metrics").text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "dsphere_requests"
        for s in fam.samples
        if s.name == "dsphere_requests_total"
    )


def _openapi() -> dict[str, Any]:
    spec: dict[str, Any] = create_app(load_settings(admin_token=ADMIN_TOKEN), CollectorRegistry()).openapi()
    return spec


OPENAPI = _openapi()
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
        "generation": {"max-examples": EXAMPLES},
        "phases": {"stateful": {"enabled": False}},
        "request-timeout": 30,
        "operations": [
            {
                # The body must reach the served model, not stop at 404 for a random {name}.
                "include-path": INFER,
                "parameters": {"name": MODEL_NAME},
                # A schema-valid V2InferRequest may still have a shape, datatype or value range the
                # model refuses (400) or N > DSPHERE_MAX_BATCH_FILES (413): OpenAPI cannot say so.
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", 400, 413]}},
            },
            {
                # `format: binary` admits any bytes; the server decodes them and answers 400 (not an
                # image), 413 (too many pixels) or 415 (another image format) as documented.
                "include-path": ["/classify", "/classify/batch"],
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", 400, 413, 415]}},
            },
            {
                # The same bytes, and a `model` query that names a model of the store only by chance:
                # 404 otherwise (the pattern admits any name).
                "include-path": "/explain",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", 400, 404, 413, 415]}},
            },
        ],
    }
)
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)


def test_fuzzed_document_is_the_served_one(server: ServerHandle) -> None:
    with server.client() as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200 and r.json() == OPENAPI
    assert len(OPENAPI["paths"]) >= 12


@schema.parametrize()
def test_api_conforms_to_its_openapi(case: schemathesis.Case, server: ServerHandle) -> None:
    response = case.call_and_validate(base_url=server.url)
    TALLY.add(case.operation.label, response.status_code)


@pytest.mark.parametrize(
    "path,url",
    [
        ("/models/{name}", f"/models/{MODEL_NAME}"),
        ("/v2/models/{name}", f"/v2/models/{MODEL_NAME}"),
        ("/v2/models/{name}/ready", f"/v2/models/{MODEL_NAME}/ready"),
    ],
)
def test_served_model_answers_conform(server: ServerHandle, path: str, url: str) -> None:
    """The fuzzer's random {name} only meets 404s; the served model's answers are checked here."""
    with server.client() as c:
        r = c.get(url)
    assert r.status_code == 200, r.text
    schema[path]["GET"].validate_response(r)


def _operations() -> int:
    return sum(len(methods) for methods in OPENAPI["paths"].values())


def _fuzz_in_subprocess() -> None:
    """Run the fuzzing test, then this one, in a fresh pytest: this one checks what it sent."""
    tests = [f"{__file__}::{t.__name__}" for t in (test_api_conforms_to_its_openapi,
                                                    test_fuzzing_sent_enough_requests_and_no_server_error)]
    env = {**os.environ, "DSPHERE_FUZZ_SUBPROCESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *tests], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    print(proc.stdout[-3000:])


def test_fuzzing_sent_enough_requests_and_no_server_error(server: ServerHandle) -> None:
    """Counts what the fuzzing test of this module sent, from the server's metrics. When it did not
    run before this test in this session (for every operation), both run in a subprocess."""
    if len(TALLY.by_operation) < _operations() and not os.environ.get("DSPHERE_FUZZ_SUBPROCESS"):
        _fuzz_in_subprocess()
        return
    served = requests_served(server)
    assert TALLY.cases >= MIN_REQUESTS, f"only {TALLY.cases} generated requests"
    assert served >= TALLY.cases
    assert len(TALLY.by_operation) == _operations()
    assert not [s for s in TALLY.statuses if s >= 500], TALLY.statuses
    assert server.alive()
    assert "Traceback" not in server.log_text(), server.log_tail()
    print(f"\n[schemathesis] {TALLY.cases} generated requests (server counted {served:.0f} in all), "
          f"statuses {dict(sorted(TALLY.statuses.items()))}")
    for op, statuses in sorted(TALLY.by_operation.items()):
        print(f"[schemathesis]   {op}: {dict(sorted(statuses.items()))}")
