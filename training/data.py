"""Datasets from their standard files: MNIST / Fashion-MNIST (four IDX files, gz or raw)
and CIFAR-10 (python-version batches). Images as float32 [0, 1] tensors (N, C, H, W).

Missing or corrupt files raise DataError with one line saying what was expected where and
how to get it; the CLI prints that line, never a traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_DIR = "cifar-10-batches-py"

# sha256 of the four .gz files as shipped by Debian's dataset-fashion-mnist (verified on
# this machine); --download checks each file against these before using it. Other datasets
# take their checksums from a JSON file ({"file.gz": "sha256", ...}) passed by the user.
SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
}

DEFAULT_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "data/mnist",
    "cifar10": "data/cifar10",
}
DATASETS = tuple(DEFAULT_DIRS)
# The L-inf threat model of each dataset, on [0, 1] pixels: the paper's 0.3 for MNIST, 0.1 for
# Fashion-MNIST (its PGD-trained models lose too much clean accuracy at 0.3), the usual 8/255 for
# CIFAR-10. Training, export, evaluation and the Table 1 reproduction all read it from here.
DEFAULT_EPS = {"fashion-mnist": 0.1, "mnist": 0.3, "cifar10": 8 / 255}
HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install -y dataset-fashion-mnist`, or pass --download",
    "mnist": "copy the four MNIST IDX files there, or pass --download with --download-url",
    "cifar10": f"extract cifar-10-python.tar.gz there (it contains {CIFAR_DIR}/)",
}


class DataError(Exception):
    """A dataset file is missing or corrupt; the message is one line for the user."""


@dataclass(frozen=True)
class Dataset:
    name: str
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, idx: torch.Tensor | np.ndarray | slice) -> Dataset:
        return Dataset(self.name, self.images[idx], self.labels[idx], self.class_names)


def data_dir(name: str, override: str | os.PathLike[str] | None = None) -> Path:
    """The option wins, then DSPHERE_DATA_DIR, then the dataset's default directory."""
    if override:
        return Path(override)
    env = os.environ.get("DSPHERE_DATA_DIR")
    return Path(env) if env else Path(DEFAULT_DIRS[name])


def _find_idx(directory: Path, stem: str, name: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{name}: expected {stem}[.gz] in {directory}; {HOW_TO_GET[name]}")


def read_idx(path: Path, name: str = "dataset") -> np.ndarray:
    """Parse one IDX file (gz or raw): magic 0x0000 08 nd, nd big-endian int32 dims, uint8 data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{name}: cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name}: {path} is not an IDX file of uint8 (bad magic number)")
    nd = raw[3]
    header = 4 + 4 * nd
    if len(raw) < header:
        raise DataError(f"{name}: {path} is truncated (header)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DataError(f"{name}: {path} is truncated or corrupt: expected {expected} bytes of data "
                        f"for shape {dims}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_dataset(name: str, directory: Path, split: str) -> Dataset:
    images = read_idx(_find_idx(directory, IDX_FILES[f"{split}_images"], name), name)
    labels = read_idx(_find_idx(directory, IDX_FILES[f"{split}_labels"], name), name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{name}: images {images.shape} and labels {labels.shape} in {directory} do not match")
    if labels.max(initial=0) > 9:
        raise DataError(f"{name}: labels in {directory} are outside 0-9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    classes = FASHION_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    return Dataset(name, x, y, classes)


def load_cifar10(directory: Path, split: str) -> Dataset:
    base = directory / CIFAR_DIR if (directory / CIFAR_DIR).is_dir() else directory
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for fname in files:
        path = base / fname
        if not path.is_file():
            raise DataError(f"cifar10: expected {fname} in {base}; {HOW_TO_GET['cifar10']}")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")  # the format's own encoding (trusted local file)
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as e:  # any unpickling/shape error means a corrupt batch
            raise DataError(f"cifar10: {path} is corrupt: {type(e).__name__}: {e}") from None
        xs.append(data)
        ys.append(labels)
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    y = torch.from_numpy(np.concatenate(ys))
    return Dataset("cifar10", x, y, CIFAR10_CLASSES)


def load_dataset(name: str, split: str, directory: str | os.PathLike[str] | None = None) -> Dataset:
    """Load `split` ("train" or "test") of `name` from its directory (see data_dir)."""
    if name not in DEFAULT_DIRS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; expected train or test")
    d = data_dir(name, directory)
    if not d.is_dir():
        raise DataError(f"{name}: data directory {d} does not exist; {HOW_TO_GET[name]}")
    if name == "cifar10":
        return load_cifar10(d, split)
    return load_idx_dataset(name, d, split)


def train_val_split(ds: Dataset, n_val: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out n_val examples (seeded) for validation: used to calibrate rho, never trained on."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds), generator=g)
    return ds.subset(perm[n_val:]), ds.subset(perm[:n_val])


def training_splits(name: str, data_dir: str | os.PathLike[str] | None, n_val: int) -> tuple[Dataset, Dataset]:
    """The training split's (train, validation) parts as every run makes them: n_val images (at
    most a tenth) held out with seed 0. Export and evaluation calibrate and fit on the same split."""
    full = load_dataset(name, "train", data_dir)
    return train_val_split(full, min(n_val, len(full) // 10), seed=0)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(name: str, base_url: str, directory: str | os.PathLike[str] | None = None,
             checksums: dict[str, str] | None = None, timeout: float = 60.0) -> Path:
    """Fetch the four .gz IDX files of `name` from `base_url` into the data directory,
    verifying each file's sha256 before it is moved into place. Files already present
    with the right checksum are kept."""
    sums = checksums if checksums is not None else SHA256.get(name)
    if not sums:
        raise DataError(f"{name}: no download checksums known; place the files by hand")
    d = data_dir(name, directory)
    d.mkdir(parents=True, exist_ok=True)
    for fname, digest in sums.items():
        target = d / fname
        if target.is_file() and sha256_file(target) == digest:
            continue
        url = base_url.rstrip("/") + "/" + fname
        tmp = target.with_suffix(target.suffix + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{name}: download of {url} failed: {e}") from None
        got = sha256_file(tmp)
        if got != digest:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{name}: {url} has sha256 {got}, expected {digest}; refusing it")
        tmp.replace(target)
    return d
