"""Train-step time of the paper's MNIST CNN (Table 4) built from SphereConv2d vs the same
CNN from nn.Conv2d, measured in one run. Target ratio <= 1.15.

    python bench/bench_sphere_conv.py [--steps 30] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from training.models import ModelConfig, build_model


def step_time(arch: str, head: str, steps: int, batch_size: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, head=head))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        logits, _ = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    base = step_time("baseline", "softmax", a.steps, a.batch_size)
    sphere = step_time("dsphere", "wsoftmax", a.steps, a.batch_size)
    print(f"nn.Conv2d CNN      train step (median): {base * 1e3:7.1f} ms")
    print(f"SphereConv2d CNN   train step (median): {sphere * 1e3:7.1f} ms")
    print(f"ratio sphere/conv: {sphere / base:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
