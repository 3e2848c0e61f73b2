"""The serving images' dependency lists, read from pyproject.toml (run by the Dockerfile).

Writes requirements-cpu.txt and requirements-gpu.txt next to pyproject.toml in the current
directory: the base dependencies + the `serve` extra; the cpu list adds the `openvino` extra (the
bf16 path, app/runtimes.py); the gpu list swaps onnxruntime for the `gpu` extra (onnxruntime-gpu),
because both wheels install the same `onnxruntime` module and must never be installed together.
Exits non-zero if torch (or onnx, onnxscript: the `train` extra's export tools) would end up in a
serving image, or if a list holds other than exactly one onnxruntime flavour.

A plain file rather than a Dockerfile heredoc: podman/buildah before 1.33 and Docker without
BuildKit do not read heredocs.
"""

import re
import sys
import tomllib

FORBIDDEN = {"torch", "torchvision", "onnx", "onnxscript"}
FLAVOURS = {"onnxruntime", "onnxruntime-gpu"}


def name(req: str) -> str:
    """The normalized distribution name of a requirement string."""
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def requirement_lists(project: dict) -> dict[str, list[str]]:
    extras = project["optional-dependencies"]
    serve = list(project.get("dependencies", [])) + list(extras["serve"])
    cpu = serve + list(extras["openvino"])
    gpu = [r for r in serve if name(r) != "onnxruntime"] + list(extras["gpu"])
    return {"cpu": cpu, "gpu": gpu}


def main() -> int:
    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    lists = requirement_lists(project)
    for flavour, reqs in lists.items():
        names = {name(r) for r in reqs}
        if names & FORBIDDEN:
            print(f"{flavour}: training dependencies in a serving image: {sorted(names & FORBIDDEN)}", file=sys.stderr)
            return 1
        if len(names & FLAVOURS) != 1:
            print(f"{flavour}: needs exactly one onnxruntime flavour, has {sorted(names & FLAVOURS)}", file=sys.stderr)
            return 1
    for flavour, reqs in lists.items():
        with open(f"requirements-{flavour}.txt", "w") as f:
            f.write("\n".join(reqs) + "\n")
        print(f"requirements-{flavour}.txt:", *reqs, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
