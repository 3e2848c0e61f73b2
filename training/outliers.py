"""Synthetic out-of-distribution images, made on the fly (no other image set is needed).

Rejection training (training/rejection.py) trains the rule to reject the TRAINED kinds; the
evaluation reports the reject rate of every kind, the HELD_OUT kinds included, which the
model never sees in training: the point is a rule that rejects what it has not seen.

Every generator takes a batch of in-distribution images x (N, C, H, W) in [0, 1] (some kinds
are made from them: permuted pixels, shuffled patches, inverted images) and a torch.Generator,
and returns N images of the same shape in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Generator = Callable[[Tensor, torch.Generator | None], Tensor]


def _rand(x: Tensor, g: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=g, device=x.device, dtype=x.dtype) if shape else torch.rand(
        x.shape, generator=g, device=x.device, dtype=x.dtype)


def constant(x: Tensor, g: torch.Generator | None) -> Tensor:
    """One gray level per image, black (0) to white (1)."""
    return _rand(x, g, len(x), 1, 1, 1).expand_as(x).clone()


def uniform_noise(x: Tensor, g: torch.Generator | None) -> Tensor:
    return _rand(x, g)


def gaussian_noise(x: Tensor, g: torch.Generator | None) -> Tensor:
    """N(μ, σ²) per pixel, μ ~ U(0.2, 0.8) and σ ~ U(0.05, 0.4) per image, clipped."""
    mu = 0.2 + 0.6 * _rand(x, g, len(x), 1, 1, 1)
    sigma = 0.05 + 0.35 * _rand(x, g, len(x), 1, 1, 1)
    return (mu + sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)).clamp(0, 1)


def salt_and_pepper(x: Tensor, g: torch.Generator | None) -> Tensor:
    """A share p ~ U(0.05, 0.5) of the pixels set to 0 or 1 on a gray or black background."""
    p = 0.05 + 0.45 * _rand(x, g, len(x), 1, 1, 1)
    background = 0.5 * _rand(x, g, len(x), 1, 1, 1).round()
    hit = _rand(x, g) < p
    return torch.where(hit, _rand(x, g).round(), background.expand_as(x))


def pixel_permuted(x: Tensor, g: torch.Generator | None) -> Tensor:
    """Each image's pixels in a random order: its histogram, none of its shape."""
    flat = x.flatten(1)
    order = torch.argsort(_rand(x, g, *flat.shape), dim=1)
    return flat.gather(1, order).view_as(x)


def patch_shuffled(x: Tensor, g: torch.Generator | None, patch: int = 7) -> Tensor:
    """Each image cut into patch x patch tiles put back in a random order."""
    n, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    tiles = x[:, :, : gh * patch, : gw * patch].reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, gh * gw, c, patch, patch)
    order = torch.argsort(_rand(x, g, n, gh * gw), dim=1)
    tiles = tiles.gather(1, order.view(n, -1, 1, 1, 1).expand_as(tiles))
    out = tiles.reshape(n, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * patch, gw * patch)
    result = x.clone()
    result[:, :, : gh * patch, : gw * patch] = out
    return result


def smooth_blobs(x: Tensor, g: torch.Generator | None) -> Tensor:
    """Low-frequency noise: a 4x4 to 7x7 random grid upsampled bicubically, contrast stretched."""
    n, c, h, w = x.shape
    k = int(4 + 4 * float(_rand(x, g, 1)))  # one grid size per batch
    grid = _rand(x, g, n, c, min(k, 7), min(k, 7))
    up = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    lo = up.amin(dim=(1, 2, 3), keepdim=True)
    hi = up.amax(dim=(1, 2, 3), keepdim=True)
    return ((up - lo) / (hi - lo + 1e-6)).clamp(0, 1)


# Held out of training: reported by the evaluation, never trained on.
def gratings(x: Tensor, g: torch.Generator | None) -> Tensor:
    """Sinusoidal stripes of a random orientation, period (3 to 14 px) and phase."""
    n, c, h, w = x.shape
    theta = math.pi * _rand(x, g, n, 1, 1, 1)
    period = 3 + 11 * _rand(x, g, n, 1, 1, 1)
    phase = 2 * math.pi * _rand(x, g, n, 1, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    proj = xx * torch.cos(theta) + yy * torch.sin(theta)
    return (0.5 + 0.5 * torch.sin(2 * math.pi * proj / period + phase)).expand(n, c, h, w).clone()


def checkerboard(x: Tensor, g: torch.Generator | None) -> Tensor:
    """Squares of 2 to 7 px, two random gray levels."""
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    sizes = (2 + 6 * _rand(x, g, n)).long().tolist()
    a, b = _rand(x, g, n), _rand(x, g, n)
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    for i, s in enumerate(sizes):
        board = ((yy // s + xx // s) % 2).to(x.dtype)
        out[i] = (a[i] + (b[i] - a[i]) * board).expand(c, h, w)
    return out


def blocky_noise(x: Tensor, g: torch.Generator | None) -> Tensor:
    """Uniform noise on a 7x7 grid, upsampled without smoothing (4 px blocks)."""
    n, c, h, w = x.shape
    return F.interpolate(_rand(x, g, n, c, 7, 7), size=(h, w), mode="nearest")


def inverted(x: Tensor, g: torch.Generator | None) -> Tensor:
    """The in-distribution image in negative: a dark garment on a white ground."""
    return 1.0 - x


TRAINED: dict[str, Generator] = {
    "constant": constant,
    "uniform_noise": uniform_noise,
    "gaussian_noise": gaussian_noise,
    "salt_and_pepper": salt_and_pepper,
    "pixel_permuted": pixel_permuted,
    "patch_shuffled": patch_shuffled,
    "smooth_blobs": smooth_blobs,
}
HELD_OUT: dict[str, Generator] = {
    "gratings": gratings,
    "checkerboard": checkerboard,
    "blocky_noise": blocky_noise,
    "inverted": inverted,
}
KINDS: dict[str, Generator] = {**TRAINED, **HELD_OUT}


def make_outliers(kind: str, x: Tensor, g: torch.Generator | None) -> Tensor:
    if kind not in KINDS:
        raise ValueError(f"unknown outlier kind {kind!r}; expected one of {', '.join(KINDS)}")
    return KINDS[kind](x, g).clamp(0.0, 1.0)


def mixed_trained_outliers(x: Tensor, g: torch.Generator | None) -> Tensor:
    """One outlier per image of x, the trained kinds in equal shares (a random kind per row)."""
    kinds = list(TRAINED.values())
    which = torch.randint(len(kinds), (len(x),), generator=g, device=x.device)
    out = torch.empty_like(x)
    for k, make in enumerate(kinds):
        rows = (which == k).nonzero().flatten()
        if len(rows):
            out[rows] = make(x[rows], g).clamp(0.0, 1.0)
    return out
