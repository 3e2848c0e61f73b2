"""Shared fixtures: real Fashion-MNIST (Debian's dataset-fashion-mnist) and a tiny
D-SphereNet trained once per session on a few thousand real images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.data import DEFAULT_DIRS, Dataset, load_dataset
from training.models import ModelConfig
from training.train import train

FASHION_DIR = Path(DEFAULT_DIRS["fashion-mnist"])
TINY = dict(widths=(8, 16, 16), fc_dim=32)


@pytest.fixture(scope="session")
def fashion_test() -> Dataset:
    return load_dataset("fashion-mnist", "test", FASHION_DIR)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny D-SphereNet (cosine, WM head) trained 3 epochs on 4,000 real images."""
    out = tmp_path_factory.mktemp("tiny_run")
    torch.set_num_threads(1)
    cfg = TrainConfig(epochs=3, limit_train=4000, n_val=1000, checkpoint_every=0, batch_size=64, lr=3e-3)
    train(ModelConfig(**TINY), cfg, out, show_progress=False)
    return out / "final"
