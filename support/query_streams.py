"""What a query attack sends, for the tests of the query-history detector."""

from __future__ import annotations

import numpy as np


def square_queries(x: np.ndarray, n: int, eps: float = 0.1, seed: int = 0) -> list[np.ndarray]:
    """Square's queries on one image x ([C, H, W] in [0, 1]): random squares of ±eps, each
    candidate kept as the next iterate half the time."""
    rng = np.random.default_rng(seed)
    adv, out = x.copy(), []
    for _ in range(n):
        s = int(rng.integers(2, 8))
        r, c = rng.integers(0, x.shape[-1] - s, 2)
        cand = adv.copy()
        cand[:, r:r + s, c:c + s] = np.clip(x[:, r:r + s, c:c + s] + eps * rng.choice([-1, 1]), 0, 1)
        out.append(cand)
        adv = cand if rng.random() < 0.5 else adv
    return out
