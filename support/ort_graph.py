"""What ONNX Runtime makes of a model.onnx on this CPU: its optimized graph, read back through
`SessionOptions.optimized_model_filepath` (bench/bench_models.py, bench/graph_forms.py and the
serving-graph test count nodes and layout reorders in it)."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort


def optimized_graph_counts(model_path: Path, threads: int = 0) -> tuple[int, int]:
    """(nodes, layout reorders) of ONNX Runtime's optimized graph of model_path on this CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # the "hardware-specific optimized model" warning
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        kinds = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return sum(kinds.values()), kinds["ReorderInput"] + kinds["ReorderOutput"]
