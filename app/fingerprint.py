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

import hashlib
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


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
    """splitmix64's finalizer, elementwise (uint64 arithmetic wraps mod 2^64)."""
    h = h ^ (h >> np.uint64(30))
    h = h * _M1
    h = h ^ (h >> np.uint64(27))
    h = h * _M2
    return h ^ (h >> np.uint64(31))


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
        """x: (N, C, H, W) in [0, 1]."""
        p = self.params
        x = np.asarray(x, np.float32)
        n, c, height, width = x.shape
        hp, wp = height // p.pool, width // p.pool
        # block sums (means times pool²), quantized: floor(mean · 255 / step), no clip needed past [0, 1]
        blocks = x[:, :, : hp * p.pool, : wp * p.pool].reshape(n, c, hp, p.pool, wp, p.pool).sum(axis=(3, 5))
        q = np.floor(np.clip(blocks, 0.0, p.pool * p.pool) * (255.0 / (p.step * p.pool * p.pool)))
        out = np.zeros((n, p.hashes), np.uint64)
        rows, cols = hp - p.patch + 1, wp - p.patch + 1
        if rows < 1 or cols < 1:
            return out
        patches = q.reshape(n, -1)[:, self._patch_index(c, hp, wp)]  # (n, patches, c·p·p)
        code, constant = self._code(patches)
        with np.errstate(over="ignore"):
            h = _mix(code ^ self._key)  # keyed: without the salt's key the ranking below is unknown
        for i in range(n):
            out[i] = _top_distinct(h[i][~constant[i]], p.hashes)
        return out

    def _code(self, patches: NDArray[np.float64]) -> tuple[NDArray[np.uint64], NDArray[np.bool_]]:
        """Each patch's values as one integer, and whether the patch is constant. Digits in base
        `levels` (exact in float64 while levels^size < 2^53: one BLAS product), else a sum with
        random odd multipliers mod 2^64."""
        levels = int(255 // self.params.step) + 1
        size = patches.shape[2]
        if levels**size < 2**53:
            weights = float(levels) ** np.arange(size)
            code = patches @ weights
            ones = float(weights.sum())  # a constant patch of value v codes to v · Σ levels^j
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

    def _coefficients(self, size: int) -> NDArray[np.uint64]:
        """Random odd multipliers, one per patch position; drawn once per input shape."""
        cached = getattr(self, "_coef", None)
        if cached is None or len(cached) != size:
            self._coef = self._rng.integers(0, 2**63, size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        return self._coef


def _top_distinct(h: NDArray[np.uint64], k: int) -> NDArray[np.uint64]:
    """The k largest distinct values of h, descending, padded with 0: a partition first (a
    window repeated in an image repeats its hash), a sort of what it leaves."""
    m = min(len(h), 4 * k)
    top = np.unique(np.partition(h, len(h) - m)[len(h) - m:]) if m else h
    if len(top) < k and m < len(h):
        top = np.unique(h)
    out = np.zeros(k, np.uint64)
    best = top[::-1][:k]
    out[: len(best)] = best
    return out
