"""Shared helpers of tests/deploy (no pytest fixtures here: plain functions)."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
RULES_DIR = MONITORING / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "dsphere.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
API_JOB = "dsphere-api"


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_test(n: int) -> tuple[Any, list[int]]:
    """The first n Fashion-MNIST test images, uint8 [n, 28, 28], and their labels (IDX files:
    a 16-byte header before the pixels, an 8-byte one before the labels)."""
    import numpy as np

    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", "rb") as f:
        f.read(16)
        images = np.frombuffer(f.read(n * 28 * 28), np.uint8).reshape(n, 28, 28)
    with gzip.open(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        f.read(8)
        labels = list(f.read(n))
    return images, labels


def png_bytes(img: Any) -> bytes:
    """A uint8 [H, W] array as a PNG file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def tool(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll `check` until it returns something truthy; AssertionError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # connection refused while starting, etc.
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- compose YAML
class _ComposeTag:
    """A Compose merge tag (!reset / !override) and the value it carries."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value

    def __repr__(self) -> str:
        return f"{self.tag} {self.value!r}"


class ComposeLoader(yaml.SafeLoader):
    pass


def _tag_constructor(loader: yaml.SafeLoader, node: yaml.Node) -> _ComposeTag:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return _ComposeTag(node.tag, value)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tag_constructor)


def load_compose(path: Path) -> dict[str, Any]:
    with path.open() as f:
        data = yaml.load(f, Loader=ComposeLoader)  # noqa: S506 - SafeLoader subclass
    assert isinstance(data, dict), f"{path.name}: top level must be a mapping"
    return data


_UNIQUE_KEYS = {"ports", "volumes", "secrets", "configs", "expose"}


def merge_compose(base: Any, override: Any, key: str = "") -> Any:
    """Compose-spec merge (mappings merged, sequences appended, !reset/!override honoured)."""
    if isinstance(override, _ComposeTag):
        if override.tag == "!reset":
            return None
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if k in out:
                merged = merge_compose(out[k], v, k)
                if merged is None and isinstance(v, _ComposeTag):
                    del out[k]
                else:
                    out[k] = merged
            elif isinstance(v, _ComposeTag):
                if v.tag == "!override":
                    out[k] = v.value
            else:
                out[k] = v
        return out
    if isinstance(base, list) and isinstance(override, list):
        if key in {"command", "entrypoint", "test"}:
            return override
        out_l = list(base)
        for item in override:
            if key in _UNIQUE_KEYS and item in out_l:
                continue
            out_l.append(item)
        return out_l
    return override


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """${VAR}, ${VAR:-default}, ${VAR-default} as Compose does, with an empty environment."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if name in env and (env[name] or op != ":-"):
            return env[name]
        if op in (":-", "-"):
            return arg
        return ""

    return _ENV.sub(sub, value)


# ----------------------------------------------------------------- Dockerfile
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; line continuations joined (the Dockerfile has no heredocs:
    test_dockerfile_needs_no_recent_frontend)."""
    out: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i].strip()
            i += 1
            if nxt.startswith("#"):
                continue
            line = line[:-1].rstrip() + " " + nxt
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def dockerfile_cuda_major() -> int:
    """The CUDA major version of the gpu image's default base (ARG CUDA_IMAGE=nvidia/cuda:M.m...)."""
    m = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", DOCKERFILE.read_text(), re.M)
    assert m, "Dockerfile: no ARG CUDA_IMAGE=nvidia/cuda:<major>.<minor>..."
    return int(m.group(1))


def cuda_majors(requires_dist: list[str]) -> set[int]:
    """The CUDA major versions an onnxruntime-gpu wheel's metadata asks for (its `cuda` extra names
    nvidia-cuda-runtime-cu12~=12.0, or nvidia-cuda-runtime~=13.0 from 1.29 on)."""
    found = (re.match(r"nvidia-cuda-runtime(?:-cu\d+)?\s*~=\s*(\d+)", r) for r in requires_dist)
    return {int(m.group(1)) for m in found if m}


def dockerfile_stages(text: str) -> list[dict[str, Any]]:
    """Stages in order: {'base', 'name', 'instructions'}; ARG defaults before FROM resolved."""
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for instr, rest in dockerfile_instructions(text):
        if instr == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif instr == "FROM":
            parts = rest.split()
            parts = [p for p in parts if not p.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else None
            stages.append({"base": base, "name": name, "instructions": []})
        else:
            assert stages, f"{instr} before the first FROM"
            stages[-1]["instructions"].append((instr, rest))
    return stages


def dockerignore_patterns() -> list[str]:
    return [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def dockerignore_includes(rel: str) -> bool:
    """Whether `rel` (a top-level path) reaches the build context: last matching rule wins."""
    from fnmatch import fnmatch

    rel = rel.strip("/").removeprefix("./")
    included = True
    for pat in dockerignore_patterns():
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        if fnmatch(rel, p) or fnmatch(rel.split("/")[0], p):
            included = neg
    return included


# ------------------------------------------------------------------ dashboard
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "5s",
    "$__range": "5m",
    "${__rate_interval}": "1m",
    "${__interval}": "5s",
    "${__range}": "5m",
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every panel (rows' nested panels included), rows themselves excluded."""
    dash = dash or dashboard()
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def dashboard_queries(dash: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL with Grafana variables substituted) for every target."""
    dash = dash or dashboard()
    variables = {v["name"]: v.get("allValue") or ".*" for v in dash.get("templating", {}).get("list", [])}
    out = []
    for panel in dashboard_panels(dash):
        for t in panel.get("targets", []):
            if t.get("hide"):
                continue
            expr = t["expr"]
            for k, v in GRAFANA_VARS.items():
                expr = expr.replace(k, v)
            for name, value in variables.items():
                expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            out.append((panel["title"], t.get("refId", "?"), expr))
    return out


def derived_prometheus_config(target: str, out_dir: Path, interval: str = "1s") -> Path:
    """monitoring/prometheus.yml with the api job pointed at `target` (static), 1s intervals,
    the SAME rule files (absolute paths), other jobs dropped."""
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    cfg["global"]["scrape_interval"] = interval
    cfg["global"]["evaluation_interval"] = interval
    cfg["rule_files"] = [str((PROMETHEUS_CONFIG.parent / r).resolve()) for r in cfg["rule_files"]]
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == API_JOB]
    assert len(jobs) == 1, f"prometheus.yml must have exactly one {API_JOB} job"
    job = jobs[0]
    job.pop("dns_sd_configs", None)
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = interval
    job["scrape_timeout"] = interval
    cfg["scrape_configs"] = [job]
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
