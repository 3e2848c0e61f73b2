"""The timing loop every benchmark here shares. Benchmarks run as scripts (`python bench/<name>.py`),
so this folder is on their import path and they import it as `timing`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of fn."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_image_us(run: Callable[[Any], object], x: Any, calls: int, warmup: int = 10) -> list[float]:
    """`calls` timed calls of run(x), after `warmup` untimed ones: microseconds per image (row of x) of each."""
    for _ in range(warmup):
        run(x)
    return [seconds(lambda: run(x)) * 1e6 / len(x) for _ in range(calls)]
