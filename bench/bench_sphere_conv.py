"""Train-step time of the paper's MNIST CNN (Table 4) built from SphereConv2d vs the same
CNN from nn.Conv2d, measured in one run. Target ratio <= 1.15.

    python bench/bench_sphere_conv.py [--steps 60] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from timing import seconds

from training.models import ModelConfig, build_model


class Stepper:
    """One Adam train step of a fresh model on a fixed random batch."""

    def __init__(self, arch: str, head: str, batch_size: int) -> None:
        torch.manual_seed(0)
        self.model = build_model(ModelConfig(arch=arch, head=head))
        self.opt = torch.optim.Adam(self.model.parameters(), 1e-3)
        self.x, self.y = torch.rand(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))

    def step(self) -> None:
        logits, _ = self.model(self.x)
        loss = F.cross_entropy(logits, self.y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def __call__(self) -> float:
        """Seconds of one step."""
        return seconds(self.step)


def step_times(steps: int, batch_size: int, block: int = 10) -> tuple[float, float]:
    """Median step time of the baseline and the D-SphereNet. They run in alternating
    blocks of `block` steps: a change in machine load hits both alike instead of biasing
    the ratio, while each block runs warm as in training (alternating single steps makes
    the two models evict each other's caches and inflates both)."""
    steppers = Stepper("baseline", "softmax", batch_size), Stepper("dsphere", "wsoftmax", batch_size)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(max(1, steps // block)):
        for stepper, acc in zip(steppers, times, strict=True):
            stepper(), stepper()  # warm-up after the other model ran, excluded
            acc.extend(stepper() for _ in range(block))
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    base, sphere = step_times(a.steps, a.batch_size)
    print(f"nn.Conv2d CNN      train step (median): {base * 1e3:7.1f} ms")
    print(f"SphereConv2d CNN   train step (median): {sphere * 1e3:7.1f} ms")
    print(f"ratio sphere/conv: {sphere / base:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
