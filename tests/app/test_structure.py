"""The shape of app/: every module imports in a fresh interpreter without torch, training/ or the
ONNX package (the serving image holds none of them); the import graph of app/ has no circle; no
function is longer than 60 lines unless it says it is a flat list; routes classify through
`Service.classify` only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "app"
MODULES = sorted(p.stem for p in APP.glob("*.py"))
FORBIDDEN = ("torch", "training", "onnx", "tests", "support")  # onnx: the package, not onnxruntime
MAX_FUNCTION_LINES = 60
FLAT_LIST = "# flat list"  # the comment that lets a longer function be (e.g. one entry per line)

IMPORT_ALL = f"""
import importlib, json, sys
for m in {MODULES!r}:
    importlib.import_module("app." + m)
print(json.dumps(sorted({{k.split(".")[0] for k in sys.modules}})))
"""


def _tree(module: str) -> ast.Module:
    return ast.parse((APP / f"{module}.py").read_text(), filename=f"app/{module}.py")


def imported(module: str) -> set[str]:
    """Top-level names of what `module` imports, and the app modules it imports as "app.<name>"
    (anywhere in the file: at the top, in a function, under TYPE_CHECKING)."""
    names: set[str] = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "app":  # from app import x: x is a module of app/
                names |= {f"app.{a.name}" for a in node.names if a.name in MODULES}
    return names


def test_every_module_imports_in_a_fresh_interpreter_without_torch_or_training() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPHERE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "app" in loaded and "onnxruntime" in loaded
    assert loaded.isdisjoint(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def test_no_module_names_torch_or_training() -> None:
    """Also imports that the fresh interpreter does not run (inside functions, behind a condition)."""
    offending = {m: sorted(n for n in imported(m) if n.split(".")[0] in FORBIDDEN) for m in MODULES}
    assert {m: names for m, names in offending.items() if names} == {}


def test_the_import_graph_of_app_is_acyclic() -> None:
    graph = {m: {n.removeprefix("app.") for n in imported(m) if n.startswith("app.")} for m in MODULES}
    assert all(deps <= set(MODULES) for deps in graph.values()), graph
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        circle = exc.args[1][::-1]  # graphlib lists each module before those that import it
        raise AssertionError(f"import circle in app/: {' imports '.join(circle)}") from None
    assert order.index("errors") < order.index("images") < order.index("classify") < order.index("main")


def test_no_function_longer_than_60_lines_unless_a_flat_list() -> None:
    long = []
    for m in MODULES:
        lines = (APP / f"{m}.py").read_text().splitlines()
        for node in ast.walk(_tree(m)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and not any(FLAT_LIST in line for line in lines[node.lineno - 1:
                                                                                          node.end_lineno]):
                    long.append(f"app/{m}.py:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_routes_classify_through_the_service_only() -> None:
    """`Service.classify` counts and quarantines; a route awaiting `ModelRuntime.classify` (rt.classify)
    itself would skip both."""
    calls = [
        f"app/{m}.py:{node.lineno} {ast.unparse(node.func)}"
        for m in MODULES if m not in ("service", "engine")
        for node in ast.walk(_tree(m))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "classify"
        and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "svc")
    ]
    assert calls == []
