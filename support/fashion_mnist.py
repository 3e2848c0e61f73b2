"""Fashion-MNIST test images (the IDX file of `apt-get install dataset-fashion-mnist`) as uint8
arrays and as PNG bytes, the uploads of the end-to-end tests and benchmarks; the training images
too (`load_fashion_mnist_train`), for the benign stream of bench/bench_query_history.py."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TEST_LABELS = TEST_IMAGES.with_name("t10k-labels-idx1-ubyte.gz")
TRAIN_IMAGES = TEST_IMAGES.with_name("train-images-idx3-ubyte.gz")
TRAIN_LABELS = TEST_IMAGES.with_name("train-labels-idx1-ubyte.gz")


def load_fashion_mnist_test(n: int, path: str | Path = TEST_IMAGES) -> np.ndarray:
    """First n test images, uint8 [n, 28, 28] (IDX: 16-byte header, then pixels)."""
    with gzip.open(path, "rb") as f:
        header = f.read(16)
        count, rows, cols = (int.from_bytes(header[i : i + 4], "big") for i in (4, 8, 12))
        n = min(n, count)
        buf = f.read(n * rows * cols)
    return np.frombuffer(buf, np.uint8).reshape(n, rows, cols)


def load_fashion_mnist_test_labels(n: int, path: str | Path = TEST_LABELS) -> np.ndarray:
    """Labels of the first n test images, uint8 [n] (IDX: 8-byte header, then one byte each)."""
    with gzip.open(path, "rb") as f:
        count = int.from_bytes(f.read(8)[4:8], "big")
        return np.frombuffer(f.read(min(n, count)), np.uint8)


def load_fashion_mnist_train(n: int = 60_000, path: str | Path = TRAIN_IMAGES) -> np.ndarray:
    """First n training images, uint8 [n, 28, 28] (the same IDX layout as the test file)."""
    return load_fashion_mnist_test(n, path)


def load_fashion_mnist_train_labels(n: int = 60_000, path: str | Path = TRAIN_LABELS) -> np.ndarray:
    """Labels of the first n training images, uint8 [n]."""
    return load_fashion_mnist_test_labels(n, path)


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [H, W] (or [H, W, 3]) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def fashion_pngs(n: int, side: int = 28) -> list[bytes]:
    """The first n Fashion-MNIST test images as PNG bytes, resized (bilinear) to side x side."""
    imgs = load_fashion_mnist_test(n)
    if side != 28:
        imgs = np.stack([np.asarray(Image.fromarray(a).resize((side, side), Image.Resampling.BILINEAR)) for a in imgs])
    return [png_bytes(a) for a in imgs]
