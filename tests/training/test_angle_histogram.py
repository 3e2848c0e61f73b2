"""The manifest's angle histogram (training/angle_stats.py: angle_histogram) on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest

from app.manifest import AngleHistogram
from training.angle_stats import angle_histogram


def test_each_angle_is_counted_once_in_its_class_and_bin() -> None:
    theta = np.array([0.0, 1.9, 2.0, 45.0, 179.0, 180.0, 90.5])
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    h = angle_histogram(theta, labels, num_classes=4, bin_deg=2.0)
    assert len(h.bin_edges_deg) == 91 and h.bin_edges_deg[0] == 0.0 and h.bin_edges_deg[-1] == 180.0
    assert [sum(row) for row in h.counts] == [3, 3, 1, 0]  # a class without images: a row of zeros
    assert h.counts[0][0] == 2 and h.counts[0][1] == 1  # [0, 2) holds 0 and 1.9; 2.0 opens [2, 4)
    assert h.counts[1][22] == 1  # 45 in [44, 46)
    assert h.counts[1][89] == 2  # the last bin holds 179 and its upper edge, 180
    assert h.counts[2][45] == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_the_counts_sum_to_the_class_sizes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 500)
    theta = rng.uniform(0, 180, 500)
    h = angle_histogram(theta, labels, 10)
    assert [sum(row) for row in h.counts] == np.bincount(labels, minlength=10).tolist()
    assert AngleHistogram.model_validate(h.model_dump()) == h


@pytest.mark.parametrize(
    ("edges", "counts", "message"),
    [
        ([0.0, 2.0, 2.0], [[1, 1]], "increase strictly"),
        ([0.0, 200.0], [[1]], "within \\[0, 180\\]"),
        ([0.0, 2.0, 4.0], [[1]], "one entry per bin"),
        ([0.0, 2.0], [[-1]], "not be negative"),
    ],
)
def test_a_malformed_histogram_is_refused(edges: list[float], counts: list[list[int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AngleHistogram(bin_edges_deg=edges, counts=counts)
