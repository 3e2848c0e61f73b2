"""Fixtures of the container tests (test_container_*.py): images built once per session."""

from __future__ import annotations

import pytest

from .podman_helpers import REPORT, BuiltImages, build_images, podman, podman_unusable, skip_or_fail


@pytest.fixture(scope="session")
def local_images() -> BuiltImages:
    """deploy/local-image.sh cpu gpu prometheus: the tree as it is now, in images (cached layers),
    then one throwaway container to prove that podman can run them here."""
    reason = podman_unusable()
    if reason:
        skip_or_fail(reason)
    images = build_images(("cpu", "gpu", "prometheus", "redis"))
    REPORT["deploy/local-image.sh cpu gpu prometheus"] = f"{images.seconds:.0f} s"
    r = podman("run", "--rm", "--network", "none", "--entrypoint", "true", images.cpu, check=False, timeout=120)
    if r.returncode != 0:
        skip_or_fail(f"podman cannot run a container here: {r.stderr.strip()[-500:]}")
    return images


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.write_sep("-", "container images (podman)")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")
