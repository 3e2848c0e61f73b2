"""Salted probabilistic fingerprints of model inputs (the query-history detector's view of a query).

After Blacklight (Li et al., USENIX Security 2022), with image patches where Blacklight has
windows of the flattened pixels: an input, as the model sees it after the service's decoding,
is quantized (`step` of 255 levels) and cut into every `patch`×`patch` square (all channels,
stride 1); each is hashed with a keyed hash and the `hashes` largest distinct hash values are
the fingerprint. Two queries that share many patches share many of their largest hashes (the
top-k of a set estimates its overlap with another set, as MinHash does), and a query attack
sends hundreds of queries that differ from each other in a few pixels: they share most
patches. Patches rather than flattened windows: an image shifted by a pixel, in any direction,
keeps every patch it had but those at its border (a flattened window of 20 values crosses a
row of 28 and changes with a horizontal shift). Patches of constant background are left out:
every Fashion-MNIST image has them, so they are no evidence of anything.

The hash is keyed by the salt (settings): a random odd multiplier per patch position and a
key, then a 64-bit finalizer (splitmix64's), so that without the salt a client can neither
compute a fingerprint nor craft inputs whose fingerprints avoid each other's. The digest of
the exact input (for exact repeats) is a keyed BLAKE2b of its bytes.

NumPy only; the parameters are chosen on the validation split (docs/QUERY_HISTORY.md).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)


@dataclass(frozen=True)
class FingerprintParams:
    step: int = 32  # quantization step, in 0..255 levels
    patch: int = 3  # side of the square patches hashed
    hashes: int = 50  # largest distinct patch hashes kept: the fingerprint's size
    pool: int = 2  # the image averaged over pool×pool blocks first (1: as it is)

    def __post_init__(self) -> None:
        if not (1 <= self.step <= 128 and 2 <= self.patch <= 16 and 1 <= self.hashes <= 256 and 1 <= self.pool <= 4):
            raise ValueError("fingerprint: step in 1..128, patch in 2..16, hashes in 1..256, pool in 1..4")


def _mix(h: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """splitmix64's finalizer, elementwise and in place (uint64 arithmetic wraps mod 2^64)."""
    h ^= h >> _S30
    h *= _M1
    h ^= h >> _S27
    h *= _M2
    h ^= h >> _S31
    return h


def _block_sums(x: NDArray[np.float32], pool: int) -> NDArray[np.float32]:
    """Sums over pool×pool blocks of (N, C, H, W), H and W multiples of pool. For pool 2, the
    pairs of columns then the pairs of rows: the same additions in the same order (so the same
    float32 bits) as NumPy's sum over the blocks' two axes, in two calls instead of a reduction."""
    if pool == 1:
        return x.copy()
    if pool == 2:
        pairs = x[..., 0::2] + x[..., 1::2]
        return pairs[:, :, 0::2] + pairs[:, :, 1::2]
    n, c, height, width = x.shape
    return x.reshape(n, c, height // pool, pool, width // pool, pool).sum(axis=(3, 5))


class Fingerprinter:
    """fingerprints(x): (N, hashes) uint64, each row sorted in descending order and padded with 0
    when an input has fewer distinct windows; digests(x): a 16-byte keyed digest per row."""

    def __init__(self, salt: bytes, params: FingerprintParams = FingerprintParams()) -> None:
        if len(salt) < 16:
            raise ValueError("the query-history salt must be at least 16 bytes")
        self.params = params
        self.salt = salt
        seed = hashlib.blake2b(salt, digest_size=32, person=b"dsphere-qh-fp").digest()
        words = np.frombuffer(seed, np.uint64)
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed[:16], "little")))
        self._rng = rng
        self._indices: dict[tuple[int, int, int], NDArray[np.intp]] = {}
        self._key = words[2] ^ words[3]
        self._digest_key = hashlib.blake2b(salt, digest_size=32, person=b"dsphere-qh-dg").digest()

    def digests(self, x: NDArray[np.floating]) -> list[bytes]:
        rows = np.ascontiguousarray(x, np.float32).reshape(len(x), -1)
        return [hashlib.blake2b(r.tobytes(), digest_size=16, key=self._digest_key).digest() for r in rows]

    def fingerprints(self, x: NDArray[np.floating]) -> NDArray[np.uint64]:
        """x: (N, C, H, W) in [0, 1]. A fixed number of NumPy calls for any N (the request path's
        cost: a single image is the common request)."""
        p = self.params
        x = np.asarray(x, np.float32)
        n, c, height, width = x.shape
        hp, wp = height // p.pool, width // p.pool
        rows, cols = hp - p.patch + 1, wp - p.patch + 1
        if rows < 1 or cols < 1:
            return np.zeros((n, p.hashes), np.uint64)
        q = _block_sums(x[:, :, : hp * p.pool, : wp * p.pool], p.pool)
        # quantized: floor(mean · 255 / step) of each block (clipped to [0, pool²]: an input past [0, 1])
        area = float(p.pool * p.pool)
        np.minimum(np.maximum(q, 0.0, out=q), area, out=q)
        np.floor(np.multiply(q, 255.0 / (p.step * area), out=q), out=q)
        patches = q.reshape(n, -1)[:, self._patch_index(c, hp, wp)]  # (n, patches, c·p·p)
        code, constant = self._code(patches)
        h = _mix(code ^ self._key)  # keyed: without the salt's key the ranking below is unknown
        h[constant] = 0
        return _top_distinct(h, p.hashes)

    def _code(self, patches: NDArray[np.floating]) -> tuple[NDArray[np.uint64], NDArray[np.bool_]]:
        """Each patch's values as one integer, and whether the patch is constant. Digits in base
        `levels` (exact in float64 while levels^size < 2^53: one BLAS product), else a sum with
        random odd multipliers mod 2^64."""
        levels = int(255 // self.params.step) + 1
        size = patches.shape[2]
        if levels**size < 2**53:
            weights, ones = self._digits(levels, size)
            code = patches @ weights
            return code.astype(np.uint64), np.fmod(code, ones) == 0
        coef = self._coefficients(size)
        with np.errstate(over="ignore"):
            code_u = (patches.astype(np.uint64) + np.uint64(1)) @ coef
        return code_u, (patches == patches[:, :, :1]).all(axis=2)

    def _patch_index(self, c: int, height: int, width: int) -> NDArray[np.intp]:
        """Where each patch's values are in a flattened (C, H, W) block image, (patches, c·p·p):
        one gather instead of a strided view; made once per input shape."""
        key = (c, height, width)
        if key not in self._indices:
            k = self.params.patch
            grid = np.arange(c * height * width).reshape(c, height, width)
            view = sliding_window_view(grid, (k, k), axis=(1, 2))  # (c, rows, cols, k, k)
            self._indices[key] = view.transpose(1, 2, 0, 3, 4).reshape((height - k + 1) * (width - k + 1), -1)
        return self._indices[key]

    @staticmethod
    @functools.cache
    def _digits(levels: int, size: int) -> tuple[NDArray[np.floating], float]:
        """The weights levels^j of a patch's values, and their sum: a constant patch of value v codes
        to v · Σ levels^j. Made once per patch size."""
        weights = float(levels) ** np.arange(size)
        return weights, float(weights.sum())

    def _coefficients(self, size: int) -> NDArray[np.uint64]:
        """Random odd multipliers, one per patch position; drawn once per input shape."""
        cached = getattr(self, "_coef", None)
        if cached is None or len(cached) != size:
            self._coef = self._rng.integers(0, 2**63, size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        return self._coef


def _top_distinct(h: NDArray[np.uint64], k: int) -> NDArray[np.uint64]:
    """Each row's k largest distinct values, descending, padded with 0 (a patch repeated in an
    image repeats its hash; 0 marks what is left out): a sort, repeats zeroed, a sort again."""
    n, m = h.shape
    s = np.sort(h, axis=1)
    s[:, 1:][s[:, 1:] == s[:, :-1]] = 0
    s.sort(axis=1)
    out = np.zeros((n, k), np.uint64)
    best = s[:, ::-1][:, :k]
    out[:, : best.shape[1]] = best
    return out
