"""Prometheus config, rules, promtool unit tests, Grafana provisioning and dashboard (static)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .deploy_helpers import (
    API_JOB,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    MONITORING,
    PROMETHEUS_CONFIG,
    RULE_FILES,
    RULE_TESTS,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    derived_prometheus_config,
    tool,
)

PROMTOOL = tool("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt install prometheus)")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def _rules() -> list[dict]:
    out = []
    for f in RULE_FILES:
        for group in yaml.safe_load(f.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def _alerts() -> list[dict]:
    return [r for r in _rules() if "alert" in r]


def _records() -> list[dict]:
    return [r for r in _rules() if "record" in r]


# ----------------------------------------------------------------- promtool
@needs_promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    r = _promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    # the config the integration test derives (static target, same rules) is valid too
    derived = derived_prometheus_config("127.0.0.1:8000", tmp_path)
    r = _promtool("check", "config", str(derived))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    assert RULE_FILES, "no rule files under monitoring/rules"
    r = _promtool("check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests() -> None:
    assert RULE_TESTS, "no promtool unit tests under monitoring/tests"
    r = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------- rules
def test_prometheus_config_loads_every_rule_file() -> None:
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    loaded: set[Path] = set()
    for pattern in cfg["rule_files"]:
        loaded |= {p.resolve() for p in PROMETHEUS_CONFIG.parent.glob(pattern)}
    assert {p.resolve() for p in RULE_FILES} <= loaded


def test_api_job_uses_dns_service_discovery() -> None:
    """`docker compose up --scale api=N`: every replica is an A record of the service name."""
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == API_JOB]
    assert "static_configs" not in job
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A" and sd["port"] == 8000
    assert "api" in sd["names"] or "tasks.api" in sd["names"]


def test_every_alert_has_severity_and_annotations() -> None:
    alerts = _alerts()
    assert len(alerts) >= 8
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    for a in alerts:
        assert a.get("labels", {}).get("severity") in {"info", "warning", "critical"}, a["alert"]
        ann = a.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), a["alert"]


def test_required_alerts_and_recording_rules_exist() -> None:
    exprs = {a["alert"]: a["expr"] for a in _alerts()}
    records = {r["record"] for r in _records()}
    assert {
        "dsphere:rejection_ratio:rate5m",
        "dsphere:rejection_ratio_by_class:rate5m",
        "dsphere:rejection_ratio:rate1h",
    } <= records
    joined = "\n".join(exprs.values())
    assert "dsphere:rejection_ratio:rate5m" in joined
    assert "dsphere:rejection_ratio_by_class:rate5m" in joined
    assert "offset" in joined and "dsphere:rejection_ratio:rate1h" in joined  # spike vs baseline
    assert "p99" in joined  # latency
    assert '"503"' in joined or "503" in "\n".join(r["expr"] for r in _records())
    assert re.search(r"up\{[^}]*\}\s*==\s*0", joined)


def test_every_alert_and_record_is_unit_tested() -> None:
    """Each alert has a promtool case where it fires and one where it is expected silent;
    each recording rule is evaluated in a promql_expr_test."""
    fired: set[str] = set()
    silent: set[str] = set()
    evaluated = ""
    for f in RULE_TESTS:
        doc = yaml.safe_load(f.read_text())
        for case in doc["tests"]:
            for t in case.get("alert_rule_test", []):
                (fired if t.get("exp_alerts") else silent).add(t["alertname"])
            for t in case.get("promql_expr_test", []):
                evaluated += t["expr"] + "\n"
    names = {a["alert"] for a in _alerts()}
    assert names - fired == set(), f"alerts never tested firing: {sorted(names - fired)}"
    assert names - silent == set(), f"alerts never tested silent: {sorted(names - silent)}"
    untested = {r["record"] for r in _records() if r["record"] not in evaluated}
    assert not untested, f"recording rules without a promql_expr_test: {sorted(untested)}"


# ----------------------------------------------------------------- grafana
def _datasource_uids() -> set[str]:
    uids = set()
    for f in DATASOURCES.glob("*.y*ml"):
        for ds in yaml.safe_load(f.read_text())["datasources"]:
            uids.add(ds["uid"])
    return uids


def test_grafana_datasource_provisioned_with_fixed_uid() -> None:
    files = list(DATASOURCES.glob("*.y*ml"))
    assert files
    (ds,) = yaml.safe_load(files[0].read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"]
    assert ds["url"] == "http://prometheus:9090"  # the compose service name


def test_grafana_dashboard_provider_points_at_dashboards() -> None:
    (f,) = DASHBOARD_PROVIDERS.glob("*.y*ml")
    (prov,) = yaml.safe_load(f.read_text())["providers"]
    assert prov["type"] == "file"
    assert prov["options"]["path"] == "/var/lib/grafana/dashboards"  # docker-compose.yml mounts it there
    assert DASHBOARD.parent == MONITORING / "grafana" / "dashboards"


def test_dashboard_panels_reference_the_provisioned_datasource() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    uids = _datasource_uids()
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] in uids, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] in uids, p["title"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] in uids


def test_dashboard_covers_required_views() -> None:
    exprs = "\n".join(q for _, _, q in dashboard_queries())
    types = {p["type"] for p in dashboard_panels()}
    for needle in (
        "dsphere_requests_total",  # request rate
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "dsphere:rejection_ratio:rate5m",
        "dsphere:rejection_ratio_by_class:rate5m",
        "dsphere_angle_degrees_bucket",
        "sum by (class_name, verdict)",
        "dsphere_inference_batch_size",
        "dsphere_queue_depth",
        'status="503"',
        "dsphere_model_info",
    ):
        assert needle in exprs, needle
    assert "heatmap" in types


def test_dashboard_queries_parse() -> None:
    """Every panel query is valid PromQL (promtool parses it through a throwaway rule file)."""
    if PROMTOOL is None:
        pytest.skip("promtool not installed")
    import tempfile

    rules = [{"record": f"dashboard:q{i}", "expr": q} for i, (_, _, q) in enumerate(dashboard_queries())]
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        r = _promtool("check", "rules", f.name)
    assert r.returncode == 0, r.stdout + r.stderr
