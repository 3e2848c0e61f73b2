"""Podman for the container tests of tests/deploy (plain functions; fixtures live in conftest.py).

The images come from deploy/local-image.sh, the same script a user runs; podman reads
deploy/containers.conf unless CONTAINERS_CONF is set. Where podman cannot run containers the
tests skip with the reason, unless DSPHERE_REQUIRE_CONTAINERS=1 (set by .ci/run) turns the skip
into a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .deploy_helpers import COMPOSE, REPO, interpolate, load_compose, png_bytes, tool, wait_for

LOCAL_IMAGE_SCRIPT = REPO / "deploy" / "local-image.sh"
CPU_IMAGE = "localhost/dsphere:cpu"
GPU_IMAGE = "localhost/dsphere:gpu"
BASE_IMAGE = os.environ.get("DSPHERE_BASE_IMAGE", "localhost/dsphere-base:bookworm")
PODMAN = tool("podman")
# podman and podman-compose read this; a caller's own CONTAINERS_CONF wins.
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / "deploy/containers.conf"))}
# What the container tests measured, printed at the end of the run (conftest.py).
REPORT: dict[str, str] = {}


def containers_required() -> bool:
    return os.environ.get("DSPHERE_REQUIRE_CONTAINERS") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip (a machine without podman), or fail where containers are required (CI)."""
    if containers_required():
        pytest.fail(f"DSPHERE_REQUIRE_CONTAINERS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert PODMAN is not None
    r = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout, env=PODMAN_ENV)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r


def podman_unusable() -> str | None:
    """Why podman cannot run containers here (None: it can, as far as checks short of a run go)."""
    if PODMAN is None:
        return "podman not installed (Debian: apt-get install -y podman runc debootstrap)"
    if os.geteuid() != 0:
        userns = Path("/proc/sys/user/max_user_namespaces")
        if userns.exists() and userns.read_text().strip() == "0":
            return "user namespaces are disabled (user.max_user_namespaces = 0): rootless podman cannot run"
        r = podman("unshare", "true", check=False, timeout=60)
        if r.returncode != 0:
            return f"rootless podman cannot enter a user namespace: {r.stderr.strip()[-500:]}"
    r = podman("info", check=False, timeout=60)
    if r.returncode != 0:
        return f"`podman info` fails: {r.stderr.strip()[-500:]}"
    return None


@dataclass
class BuiltImages:
    """What deploy/local-image.sh made (tags), its output and wall time."""

    cpu: str
    gpu: str
    prometheus: str
    log: str
    seconds: float


def build_images(steps: tuple[str, ...]) -> BuiltImages:
    """Run deploy/local-image.sh STEPS (cached layers make a rebuild of an unchanged tree quick)."""
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(LOCAL_IMAGE_SCRIPT), *steps], capture_output=True, text=True,
                       timeout=1800, env=PODMAN_ENV, cwd=REPO)  # fmt: skip
    log = r.stdout + r.stderr
    if r.returncode != 0:
        lines = [ln for ln in log.splitlines() if ln.startswith("[local-image] error")]
        if lines and "needs root" in lines[-1]:
            skip_or_fail(lines[-1].removeprefix("[local-image] error: "))
        raise AssertionError(f"deploy/local-image.sh {' '.join(steps)} exited {r.returncode}:\n{log[-6000:]}")
    prometheus = load_compose(COMPOSE)["services"]["prometheus"]["image"]
    return BuiltImages(CPU_IMAGE, GPU_IMAGE, prometheus, log, time.monotonic() - t0)


def image_size_mb(image: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()) / 1e6


def image_labels(image: str) -> dict[str, str]:
    return json.loads(podman("image", "inspect", "--format", "{{json .Labels}}", image).stdout) or {}


@dataclass
class Container:
    """A detached container publishing its port 8000 on a random loopback port."""

    name: str
    image: str
    started_at: float = 0.0
    url: str = ""

    def start(self, *options: str) -> Container:
        self.started_at = time.monotonic()
        podman("run", "-d", "--name", self.name, "-p", "127.0.0.1::8000", *options, self.image)
        port = podman("port", self.name, "8000").stdout.strip().rsplit(":", 1)[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def logs(self) -> str:
        r = podman("logs", self.name, check=False)
        return r.stdout + r.stderr

    def state(self, field_path: str) -> str:
        return podman("inspect", "--format", "{{" + field_path + "}}", self.name).stdout.strip()

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *argv, check=False)

    def healthcheck(self) -> bool:
        """Run the image's HEALTHCHECK now (podman runs no timer without systemd)."""
        return podman("healthcheck", "run", self.name, check=False).returncode == 0

    def wait_healthy(self, timeout: float = 90) -> float:
        """Seconds from `podman run` to the first passing HEALTHCHECK."""
        wait_for(f"{self.name} to pass its HEALTHCHECK", self.healthcheck, timeout, interval=0.5)
        return time.monotonic() - self.started_at

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


@contextlib.contextmanager
def running(name: str, image: str, *options: str) -> Iterator[Container]:
    """A started container, removed on exit; its log is printed when the block fails."""
    c = Container(f"dsphere-test-{os.getpid()}-{name}", image)
    podman("rm", "-f", "-t", "0", c.name, check=False)  # a leftover of an interrupted run
    try:
        yield c.start(*options)
    except BaseException:
        print(f"--- log of {c.name}\n{c.logs()[-4000:]}")
        raise
    finally:
        c.remove()


def noise_pngs(n: int, seed: int = 1234) -> list[bytes]:
    """Uniform-noise 28x28 images: far from every class, the inputs the verdict rejects."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)]


def served_model_name() -> str:
    """The model the compose stack serves by default (DSPHERE_MODEL_NAME of the api service)."""
    return interpolate(str(load_compose(COMPOSE)["services"]["api"]["environment"]["DSPHERE_MODEL_NAME"]))
