"""app/fingerprint.py's request-path implementation (a fixed number of NumPy calls for any batch)
gives, bit for bit, the fingerprints of the implementation the query-history results were measured
with (docs/results/query-history/: a per-row loop, a reduction for the block sums, a partition and
a unique per row), kept here as the reference: on Fashion-MNIST, shifted and noisy images, inputs
outside [0, 1], and other parameters (both ways of coding a patch, every pooling path)."""

from __future__ import annotations

import numpy as np
import pytest

from app.fingerprint import Fingerprinter, FingerprintParams
from support.fashion_mnist import load_fashion_mnist_test

SALT = b"a-test-salt-of-32-bytes-0123456"
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _reference_mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * _M1
    h = h ^ (h >> np.uint64(27))
    h = h * _M2
    return h ^ (h >> np.uint64(31))


def _reference_top_distinct(h: np.ndarray, k: int) -> np.ndarray:
    m = min(len(h), 4 * k)
    top = np.unique(np.partition(h, len(h) - m)[len(h) - m:]) if m else h
    if len(top) < k and m < len(h):
        top = np.unique(h)
    out = np.zeros(k, np.uint64)
    best = top[::-1][:k]
    out[: len(best)] = best
    return out


def reference_fingerprints(fp: Fingerprinter, x: np.ndarray) -> np.ndarray:
    p = fp.params
    x = np.asarray(x, np.float32)
    n, c, height, width = x.shape
    hp, wp = height // p.pool, width // p.pool
    blocks = x[:, :, : hp * p.pool, : wp * p.pool].reshape(n, c, hp, p.pool, wp, p.pool).sum(axis=(3, 5))
    q = np.floor(np.clip(blocks, 0.0, p.pool * p.pool) * (255.0 / (p.step * p.pool * p.pool)))
    out = np.zeros((n, p.hashes), np.uint64)
    if hp - p.patch + 1 < 1 or wp - p.patch + 1 < 1:
        return out
    patches = q.reshape(n, -1)[:, fp._patch_index(c, hp, wp)]
    code, constant = fp._code(patches)
    with np.errstate(over="ignore"):
        h = _reference_mix(code ^ fp._key)
    for i in range(n):
        out[i] = _reference_top_distinct(h[i][~constant[i]], p.hashes)
    return out


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = load_fashion_mnist_test(600).astype(np.float32)[:, None] / 255
    shifted = np.roll(x[:50], 1, axis=3)
    noisy = np.clip(x[:50] + rng.uniform(-0.1, 0.1, x[:50].shape).astype(np.float32), 0, 1)
    uniform = rng.random((50, 1, 28, 28), dtype=np.float32)
    outside = rng.uniform(-0.5, 1.5, (20, 1, 28, 28)).astype(np.float32)
    blank = np.zeros((2, 1, 28, 28), np.float32)
    return np.concatenate([x, shifted, noisy, uniform, outside, blank])


def test_the_default_fingerprints_are_the_measured_ones_for_single_images_and_batches() -> None:
    fp = Fingerprinter(SALT)
    x = _inputs()
    want = reference_fingerprints(fp, x)
    np.testing.assert_array_equal(fp.fingerprints(x), want)
    for i in range(0, len(x), 37):  # one image a request, as most requests are
        np.testing.assert_array_equal(fp.fingerprints(x[i : i + 1]), want[i : i + 1])
    assert (want[:600, 0] != 0).all()  # the images have fingerprints: the comparison is not of padding


@pytest.mark.parametrize(
    "params",
    [
        FingerprintParams(pool=1),
        FingerprintParams(pool=3, patch=2),
        FingerprintParams(pool=4, patch=2, hashes=20),
        FingerprintParams(step=1, patch=4),  # 256^16 codes: the multiplier path of _code
        FingerprintParams(patch=5, hashes=256),  # more hashes than patches: padded with 0
        FingerprintParams(pool=4, patch=8),  # no patch fits a 7x7 block image
    ],
)
def test_other_parameters_give_the_reference_fingerprints(params: FingerprintParams) -> None:
    x = _inputs()[::5]
    a, b = Fingerprinter(SALT, params), Fingerprinter(SALT, params)
    np.testing.assert_array_equal(a.fingerprints(x), reference_fingerprints(b, x))


def test_colour_and_odd_sized_inputs_give_the_reference_fingerprints() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((12, 3, 31, 29), dtype=np.float32)
    a, b = Fingerprinter(SALT), Fingerprinter(SALT)
    np.testing.assert_array_equal(a.fingerprints(x), reference_fingerprints(b, x))
