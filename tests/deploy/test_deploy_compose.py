"""Dockerfile, .dockerignore and docker-compose files, validated without a Docker engine,
plus the serving image's dependency set resolved in a clean venv (no torch)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .deploy_helpers import (
    COMPOSE,
    COMPOSE_CPU,
    DOCKERFILE,
    PROMETHEUS_CONFIG,
    REPO,
    cuda_majors,
    dockerfile_cuda_major,
    dockerfile_stages,
    dockerignore_includes,
    interpolate,
    load_compose,
    merge_compose,
)

TOP_LEVEL = {"name", "version", "services", "volumes", "networks", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "build", "image", "command", "entrypoint", "environment", "env_file", "volumes", "ports", "expose",
    "deploy", "healthcheck", "restart", "depends_on", "profiles", "networks", "labels", "user",
    "working_dir", "logging", "ulimits", "shm_size", "init", "stop_grace_period", "read_only",
    "tmpfs", "cap_drop", "security_opt", "configs", "secrets", "runtime", "gpus", "container_name",
}  # fmt: skip
SERVING_STAGES = ("cpu", "gpu")


def _stages() -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in dockerfile_stages(DOCKERFILE.read_text()) if s["name"]}


def _merged_cpu() -> dict[str, Any]:
    return merge_compose(load_compose(COMPOSE), load_compose(COMPOSE_CPU))


def _short_volume(spec: Any) -> tuple[str, str, str]:
    """(type, source, target) of a short or long volume spec."""
    if isinstance(spec, dict):
        return spec.get("type", "volume"), str(spec.get("source", "")), spec["target"]
    parts = str(spec).split(":")
    if len(parts) == 1:
        return "volume", "", parts[0]
    src, tgt = parts[0], parts[1]
    kind = "bind" if src.startswith((".", "/", "~")) else "volume"
    return kind, src, tgt


def _published(port: Any) -> str | None:
    """The host side of a port mapping (None: not published on a fixed host port)."""
    if isinstance(port, dict):
        pub = port.get("published")
        return None if pub is None else interpolate(str(pub))
    parts = interpolate(str(port)).split(":")
    if len(parts) == 1:
        return None
    return parts[-2]


# =============================================================== Dockerfile
def test_dockerfile_has_cpu_and_gpu_serving_targets() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    named = {s["name"]: s for s in stages if s["name"]}
    assert stages[-1]["name"] == "cpu", "the default (last) stage must be the CPU image"
    assert named["cpu"]["base"].startswith("python:3.11"), named["cpu"]["base"]
    assert named["gpu"]["base"].startswith("nvidia/cuda:") and "runtime" in named["gpu"]["base"]
    assert "cudnn" in named["gpu"]["base"]


@pytest.mark.parametrize("target", SERVING_STAGES)
def test_serving_stage_runs_gunicorn_as_non_root_with_healthcheck(target: str) -> None:
    instrs = _stages()[target]["instructions"]
    by = lambda name: [a for i, a in instrs if i == name]  # noqa: E731
    users = by("USER")
    assert users and users[-1] not in {"root", "0", "0:0"}, f"{target}: must end as a non-root USER"
    assert any("8000" in a.split() for a in by("EXPOSE")), target
    (health,) = by("HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health, "slim has no curl: use python urllib"
    (cmd,) = by("CMD")
    argv = json.loads(cmd)
    # gunicorn with gunicorn.conf.py: its uvicorn workers (app/gunicorn_worker.py), /metrics over them
    assert argv[:3] == ["gunicorn", "-c", "gunicorn.conf.py"] and argv[-1] == "app.main:app", argv
    assert "0.0.0.0:8000" in argv, argv
    # a stalled upload must not keep a stopping container alive past its grace period
    conf = (DOCKERFILE.parent / "gunicorn.conf.py").read_text()
    assert "graceful_timeout = 20" in conf and 'worker_class = "app.gunicorn_worker.Worker"' in conf
    copies = " ".join(by("COPY"))
    assert "app/" in copies and "model_store/" in copies and "gunicorn.conf.py" in copies
    env = " ".join(by("ENV"))
    assert "DSPHERE_MODEL_STORE=" in env and "DSPHERE_PROVIDERS=" in env


def test_dockerfile_copy_sources_exist_and_reach_the_context() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    seen: list[str] = []
    n_local = 0
    for stage in stages:
        for instr, args in stage["instructions"]:
            if instr not in {"COPY", "ADD"}:
                continue
            words = shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            sources = paths[:-1]
            src_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if src_stage is not None:
                assert src_stage in seen, f"COPY --from={src_stage} before that stage is defined"
                continue
            for src in sources:
                n_local += 1
                path = REPO / src
                assert path.exists(), f"{stage['name']}: COPY source {src} does not exist"
                # git keeps no empty directory: a fresh clone would lack it and the build fail
                assert path.is_file() or any(p.is_file() for p in path.rglob("*")), (
                    f"COPY source {src} is empty: commit at least one file in it (e.g. {src.rstrip('/')}/README.md)"
                )
                assert dockerignore_includes(src), f"{src} is excluded by .dockerignore"
        seen.append(stage["name"])
    assert n_local >= 3


def test_dockerignore_keeps_the_context_small() -> None:
    for heavy in (".git", ".venv", "data", "runs", "tests", "training", "docs"):
        assert not dockerignore_includes(heavy), f"{heavy} would be sent to the Docker daemon"
    for needed in ("app", "model_store", "pyproject.toml"):
        assert dockerignore_includes(needed), needed


def test_dockerfile_needs_no_recent_frontend() -> None:
    """Podman/buildah as Debian 12 ships them (buildah 1.28) and Docker without BuildKit read
    neither heredocs, RUN --mount, COPY --link/--chmod/--parents, nor a `# syntax=` frontend."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "a # syntax= line pulls a frontend image"
    for stage in dockerfile_stages(text):
        for instr, args in stage["instructions"]:
            assert "<<" not in args, f"{stage['name']}: heredoc in {instr} {args[:60]}"
            flags = (
                {w.split("=")[0] for w in args.split() if w.startswith("--")}
                if instr in {"RUN", "COPY", "ADD"}
                else set()
            )
            assert not flags & {"--mount", "--network", "--security", "--link", "--chmod", "--parents", "--exclude"}, (
                f"{stage['name']}: {instr} {sorted(flags)} needs BuildKit"
            )


def _requirements_stage_script() -> Path:
    """The script the Dockerfile's `requirements` stage copies and runs."""
    instrs = _stages()["requirements"]["instructions"]
    (copy,) = [shlex.split(a) for i, a in instrs if i == "COPY"]
    (run,) = [shlex.split(a) for i, a in instrs if i == "RUN"]
    script = next(REPO / src for src in copy[:-1] if src.endswith(".py"))
    assert run == ["python", script.name], run
    return script


def _run_requirements_script(tmp_path: Path, pyproject: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pyproject.toml").write_text(pyproject)
    script = _requirements_stage_script()
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def _requirements(tmp_path: Path) -> dict[str, list[str]]:
    """Run the Dockerfile's own requirements script on pyproject.toml."""
    r = _run_requirements_script(tmp_path, (REPO / "pyproject.toml").read_text())
    assert r.returncode == 0, r.stdout + r.stderr
    return {f: (tmp_path / f"requirements-{f}.txt").read_text().split() for f in SERVING_STAGES}


@pytest.mark.parametrize(
    ("extra", "added", "message"),
    [
        ("serve", '"torch>=2.2"', "training dependencies in a serving image: ['torch']"),
        ("serve", '"onnx>=1.16"', "training dependencies in a serving image: ['onnx']"),
        ("gpu", '"onnxruntime>=1.18"', "needs exactly one onnxruntime flavour, has ['onnxruntime', 'onnxruntime-gpu']"),
    ],
)
def test_requirements_script_refuses_a_bad_pyproject(tmp_path: Path, extra: str, added: str, message: str) -> None:
    """The build-time guard itself: a training dependency in the serve extra, or both onnxruntime
    flavours in one list, stops the build with a one-line reason (no traceback), writing nothing."""
    text = (REPO / "pyproject.toml").read_text()
    bad, n = re.subn(rf"^{extra} = \[\n", f"{extra} = [\n    {added},\n", text, count=1, flags=re.M)
    assert n == 1, f"pyproject.toml: no `{extra} = [` line"
    r = _run_requirements_script(tmp_path, bad)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.glob("requirements-*.txt"))


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_serving_requirements_have_no_training_deps(tmp_path: Path) -> None:
    reqs = _requirements(tmp_path)
    cpu, gpu = ({_name(r) for r in reqs[f]} for f in SERVING_STAGES)
    for names in (cpu, gpu):
        assert not names & {"torch", "torchvision", "onnx", "onnxscript", "matplotlib"}, names
        assert {"fastapi", "uvicorn", "numpy", "pydantic", "prometheus-client"} <= names
        assert "fastapi-offline" in names, "/docs and /redoc need their local assets in the image"
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu, "both wheels ship the same module"
    assert "openvino" in cpu and "openvino" not in gpu, "the bf16 path (DSPHERE_PRECISION) is the CPU image's"
    assert cpu - {"onnxruntime", "openvino"} == gpu - {"onnxruntime-gpu"}


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _pip_supports_python_option() -> bool:
    try:
        from pip import __version__ as pip_version
    except ImportError:
        return False
    major, minor = (int(x) for x in pip_version.split(".")[:2])
    return (major, minor) >= (22, 3)


@pytest.mark.slow
def test_serving_dependencies_resolve_without_torch(tmp_path: Path) -> None:
    """Resolve (pip --dry-run) what each image installs in a clean venv: no torch.

    The lists are `.[serve]`'s dependencies (base + serve extra, read from pyproject.toml
    by the Dockerfile's own script; the gpu list swaps onnxruntime for onnxruntime-gpu).
    Resolving the lists rather than `.[serve]` itself skips building dsphere's metadata
    in an isolated build env, which doubles the time on a loaded machine."""
    if not _pypi_reachable():
        pytest.skip("PyPI not reachable: cannot resolve the dependency set")
    venv = tmp_path / "venv"
    # A clean venv (nothing installed); this interpreter's pip resolves FOR it (`pip --python`,
    # pip >= 22.3), which saves bootstrapping pip into it. Falls back to a venv with pip.
    if _pip_supports_python_option():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
    pip += ["--disable-pip-version-check", "-q"]
    reqs = _requirements(tmp_path)
    for flavour in SERVING_STAGES:
        (tmp_path / f"{flavour}.txt").write_text("\n".join(reqs[flavour]) + "\n")
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    jobs = {
        k: [*pip, "install", "--dry-run", "--ignore-installed", "--report", str(tmp_path / f"{k}.json"),
            "-r", str(tmp_path / f"{k}.txt")]
        for k in SERVING_STAGES
    }  # fmt: skip
    procs = {k: subprocess.Popen(v, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for k, v in jobs.items()}  # fmt: skip
    for k, p in procs.items():
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, f"{k}: pip could not resolve\n{out[-3000:]}"
    for k in jobs:
        report = json.loads((tmp_path / f"{k}.json").read_text())
        assert report["environment"]["python_version"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
        names = {_name(i["metadata"]["name"]) for i in report["install"]}
        assert "torch" not in names, f"{k}: torch would be installed"
        assert {"fastapi", "uvicorn", "numpy"} <= names, names
        assert ("onnxruntime-gpu" if k == "gpu" else "onnxruntime") in names
    cpu_names = {_name(i["metadata"]["name"]) for i in json.loads((tmp_path / "cpu.json").read_text())["install"]}
    assert "onnxruntime-gpu" not in cpu_names
    # onnxruntime-gpu >= 1.27 is built for CUDA 13: on the CUDA 12 base it would never use the GPU
    gpu_ort = next(i["metadata"] for i in json.loads((tmp_path / "gpu.json").read_text())["install"]
                   if _name(i["metadata"]["name"]) == "onnxruntime-gpu")  # fmt: skip
    wants = cuda_majors(gpu_ort.get("requires_dist", []))
    assert wants == {dockerfile_cuda_major()}, f"onnxruntime-gpu {gpu_ort['version']} wants CUDA {wants}"


# ================================================================== compose
@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_top_level_structure(path: Path) -> None:
    doc = load_compose(path)
    extra = {k for k in doc if not k.startswith("x-")} - TOP_LEVEL
    assert not extra, f"{path.name}: unknown top-level keys {extra}"
    assert isinstance(doc["services"], dict) and doc["services"]
    for name, svc in doc["services"].items():
        unknown = {k for k in svc if not k.startswith("x-")} - SERVICE_KEYS
        assert not unknown, f"{path.name}:{name}: unknown keys {unknown}"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_services_are_complete(variant: str) -> None:
    doc = load_compose(COMPOSE) if variant == "gpu" else _merged_cpu()
    services = doc["services"]
    assert {"api", "prometheus", "grafana"} <= set(services)
    stages = _stages()
    declared_volumes = set(doc.get("volumes") or {})
    used_named: set[str] = set()
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: needs image or build"
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            ctx = REPO / build.get("context", ".")
            assert ctx.is_dir()
            assert (ctx / build.get("dockerfile", "Dockerfile")).is_file()
            if "target" in build:
                assert build["target"] in stages, f"{name}: unknown build target {build['target']}"
        for spec in svc.get("volumes", []):
            kind, src, _ = _short_volume(spec)
            if kind == "bind":
                assert (REPO / src).exists(), f"{name}: bind mount source {src} does not exist"
            elif src:
                used_named.add(src)
        for dep in svc.get("depends_on", []):
            assert dep in services
    assert used_named <= declared_volumes, f"named volumes not declared at top level: {used_named - declared_volumes}"
    assert {"prometheus-data", "quarantine"} <= used_named


def test_compose_api_reserves_a_gpu() -> None:
    api = load_compose(COMPOSE)["services"]["api"]
    assert api["build"]["target"] == "gpu"
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and (d.get("count") or d.get("device_ids"))
        for d in devices
    ), devices


def test_compose_api_grace_period_outlasts_the_drain() -> None:
    """The workers drain for up to 20 s on SIGTERM; Docker must not SIGKILL them before (default 10 s)."""
    api = load_compose(COMPOSE)["services"]["api"]
    grace = str(api.get("stop_grace_period", "10s"))
    assert grace.endswith("s") and int(grace[:-1]) > 20, grace


def test_compose_cpu_override_drops_the_gpu() -> None:
    api = _merged_cpu()["services"]["api"]
    assert api["build"]["target"] == "cpu"
    assert api["image"] != load_compose(COMPOSE)["services"]["api"]["image"]
    reservations = api.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert not reservations.get("devices"), "the CPU variant must not reserve a GPU"
    assert api["environment"]["DSPHERE_PROVIDERS"] == "CPUExecutionProvider"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_ports_allow_scaling(variant: str) -> None:
    """api replicas must not all claim one fixed host port; no host port used twice."""
    doc = load_compose(COMPOSE) if variant == "gpu" else _merged_cpu()
    taken: list[int] = []
    for name, svc in doc["services"].items():
        for port in svc.get("ports", []):
            pub = _published(port)
            if pub is None:
                continue
            if name == "api":
                lo, _, hi = pub.partition("-")
                assert hi and int(hi) > int(lo), f"api publishes fixed host port {pub}: --scale would conflict"
                taken.extend(range(int(lo), int(hi) + 1))
            else:
                taken.append(int(pub))
    assert len(taken) == len(set(taken)), f"host port conflict: {taken}"


def test_compose_prometheus_mounts_match_its_config() -> None:
    prom = load_compose(COMPOSE)["services"]["prometheus"]
    cmd = prom["command"]
    config_arg = next(a for a in cmd if a.startswith("--config.file="))
    config_in_container = config_arg.split("=", 1)[1]
    mounts = {tgt: src for kind, src, tgt in map(_short_volume, prom["volumes"])}
    assert Path(REPO / mounts[config_in_container]).resolve() == PROMETHEUS_CONFIG.resolve()
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    container_dir = Path(config_in_container).parent
    for pattern in cfg["rule_files"]:
        rules_dir = str(container_dir / Path(pattern).parent)
        assert rules_dir in mounts, f"rule files {pattern} not mounted at {rules_dir}"
        assert list((REPO / mounts[rules_dir]).glob(Path(pattern).name)), pattern
    data = next(a for a in cmd if a.startswith("--storage.tsdb.path=")).split("=", 1)[1]
    assert mounts.get(data) == "prometheus-data"


def test_compose_grafana_provisioning_and_access() -> None:
    graf = load_compose(COMPOSE)["services"]["grafana"]
    mounts = {tgt: src for kind, src, tgt in map(_short_volume, graf["volumes"])}
    assert (REPO / mounts["/etc/grafana/provisioning"]).resolve() == (
        REPO / "monitoring/grafana/provisioning"
    ).resolve()
    assert (REPO / mounts["/var/lib/grafana/dashboards"]).resolve() == (
        REPO / "monitoring/grafana/dashboards"
    ).resolve()
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_api_matches_prometheus_discovery() -> None:
    """Prometheus resolves the service name `api` on port 8000 (dns_sd_configs)."""
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "dsphere-api"]
    names = {n.removeprefix("tasks.") for sd in job["dns_sd_configs"] for n in sd["names"]}
    assert names <= set(load_compose(COMPOSE)["services"])
    assert all(sd["port"] == 8000 for sd in job["dns_sd_configs"])
    api = _merged_cpu()["services"]["api"]
    assert "scale" not in api and "container_name" not in api, "--scale needs no fixed container name"


def test_docker_compose_config_if_available() -> None:
    """With the Compose plugin installed, let Compose itself validate both variants."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose not installed")
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(COMPOSE_CPU)]):
        r = subprocess.run([docker, "compose", *files, "config", "-q"], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
