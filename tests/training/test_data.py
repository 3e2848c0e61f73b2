"""Dataset files: IDX parsing, clear one-line errors, sha256-verified download from a
local http.server serving the real files."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from training.data import IDX_FILES, DataError, download, load_dataset, read_idx

from .conftest import FASHION_DIR


def test_real_fashion_mnist_loads() -> None:
    train = load_dataset("fashion-mnist", "train", FASHION_DIR)
    test = load_dataset("fashion-mnist", "test", FASHION_DIR)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0
    assert sorted(set(test.labels.tolist())) == list(range(10))


def test_raw_and_gz_idx_read_the_same(tmp_path: Path) -> None:
    src = FASHION_DIR / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(src.read_bytes()))
    assert np.array_equal(read_idx(src), read_idx(raw))


def test_missing_directory_and_file_errors_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", tmp_path / "nope")
    with pytest.raises(DataError, match=r"expected t10k-images-idx3-ubyte\[\.gz\] in"):
        load_dataset("fashion-mnist", "test", tmp_path)
    with pytest.raises(DataError, match="cifar10: expected data_batch_1"):
        load_dataset("cifar10", "train", tmp_path)


def test_corrupt_file_is_reported(tmp_path: Path) -> None:
    for name in IDX_FILES.values():
        shutil.copy(FASHION_DIR / f"{name}.gz", tmp_path / f"{name}.gz")
    data = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("fashion-mnist", "test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("fashion-mnist", "test", tmp_path)


@pytest.fixture()
def file_server():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FASHION_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_sha256(file_server: str, tmp_path: Path) -> None:
    target = tmp_path / "fm"
    download("fashion-mnist", file_server, target)
    assert len(load_dataset("fashion-mnist", "test", target)) == 10000
    bad = {"t10k-labels-idx1-ubyte.gz": "0" * 64}
    with pytest.raises(DataError, match="refusing it"):
        download("fashion-mnist", file_server, tmp_path / "bad", checksums=bad)
    assert not (tmp_path / "bad" / "t10k-labels-idx1-ubyte.gz").exists()
