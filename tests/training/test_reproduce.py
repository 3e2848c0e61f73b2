"""`python -m training reproduce` on tiny synthetic MNIST (IDX gz) and CIFAR-10 (python
batches) written in their standard formats: one tiny cell each, caching, tables."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.reproduce import MODELS, PAPER_TABLE1, TRAININGS, Protocol, reproduce

ROOT = Path(__file__).resolve().parents[2]
TINY = Protocol("tiny", iterations=3, batch_size=16, limit_train=0, natural_epochs=0.0, eps_warmup_epochs=0.0,
                pgd_train_steps=2, n_eval=16, eval_pgd_steps=2, n_val=40)


def _idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Noise plus a class-dependent bright band, so there is something to learn."""
    x = rng.integers(0, 60, size=(len(labels), *shape)).astype(np.uint8)
    for i, k in enumerate(labels):
        x[i, ..., 2 * k: 2 * k + 3, :] = 250
    return x


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("synthetic")
    mnist = root / "mnist"
    mnist.mkdir()
    for split, n in (("train", 200), ("t10k", 40)):
        y = rng.integers(0, 10, n)
        _idx(mnist / f"{split}-images-idx3-ubyte.gz", _images(rng, y, (28, 28)))
        _idx(mnist / f"{split}-labels-idx1-ubyte.gz", y)
    cifar = root / "cifar10" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", 40) for i in range(1, 6)] + [("test_batch", 30)]:
        y = rng.integers(0, 10, n)
        x = _images(rng, y, (3, 32, 32)).reshape(n, 3072)
        with open(cifar / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": [int(v) for v in y], b"batch_label": name.encode()}, f)
    return {"root": root, "mnist": mnist, "cifar10": root / "cifar10"}


@pytest.mark.parametrize("dataset, model, training", [("mnist", "dsphere-wm", "fgsm"),
                                                       ("cifar10", "baseline", "natural")])
def test_tiny_cell_runs_and_is_cached(synthetic, tmp_path: Path, dataset: str, model: str, training: str) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "grid"
    path = reproduce(dataset, str(synthetic[dataset]), TINY, out, (model,), (training,))
    doc = json.loads(path.read_text())
    (row,) = doc["rows"]
    assert row["model"] == model and row["training"] == training
    for k in ("clean", "fgsm", "pgd"):
        assert 0 <= row[k]["accuracy"] <= row[k]["defended_rate"] <= 1
    assert row["rho"] > 0 and row["n_eval"] == 16
    assert row["eps"] == pytest.approx(0.3 if dataset == "mnist" else 8 / 255)
    md = (out / "reproduction.md").read_text()
    paper_clean = PAPER_TABLE1[model][training][0]
    assert f"{paper_clean:.2f}" in md
    cell = out / "cells" / f"{model}-{training}"
    assert (cell / "result.json").is_file() and (cell / "run" / "final").is_dir()
    # a second run reuses the cell: no retraining, same result
    mtime = (cell / "run" / "final" / "model.safetensors").stat().st_mtime
    msgs: list[str] = []
    reproduce(dataset, str(synthetic[dataset]), TINY, out, (model,), (training,), progress=msgs.append)
    assert any("cached" in m for m in msgs)
    assert (cell / "run" / "final" / "model.safetensors").stat().st_mtime == mtime
    # another configuration in the same cell is refused, not mixed in
    with pytest.raises(ValueError, match="another configuration"):
        reproduce(dataset, str(synthetic[dataset]), TINY, out, (model,), (training,), eps=0.05)


def test_grid_and_paper_table_cover_each_other() -> None:
    assert set(PAPER_TABLE1) == set(MODELS)
    assert all(set(v) == set(TRAININGS) for v in PAPER_TABLE1.values())
    assert PAPER_TABLE1["dsphere"]["natural"] == (99.50, 84.70, 2.31)


@pytest.mark.parametrize("args, match", [
    (["--models", "resnet"], "unknown model"),
    (["--protocol", "slow"], "unknown protocol"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "mnist"),
])
def test_cli_user_errors_are_one_line(tmp_path: Path, args: list[str], match: str) -> None:
    p = subprocess.run([sys.executable, "-m", "training", "reproduce", "--out", str(tmp_path / "o"), *args],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], p.stderr
