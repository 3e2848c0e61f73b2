"""Inputs that are not clothing at all, judged as the service would (ONNX Runtime, the served ρ):

- `ood_table`: one row per synthetic kind of training/outliers.py, the kinds rejection
  training saw and the held-out kinds it never saw, each made from the evaluation's own test
  images where the kind needs a source image (permuted, shuffled, inverted);
- `distal_table`: from uniform noise and from constant images, PGD within ε (0.1, 0.3) to get
  ANY class accepted (rule_attacks.distal_attack); the acceptance rate (lower is better).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from app.verdict import geodesic_verdict
from training.evaluation.attacks import check_ball
from training.evaluation.config import EvalConfig
from training.evaluation.rule_attacks import distal_attack
from training.evaluation.schema import DistalResult, OodResult
from training.judging import OnnxModel
from training.outliers import KINDS, TRAINED, make_outliers
from training.rejection import Rule


def _accepted(onnx_model: OnnxModel, x: Tensor, rule: Rule) -> np.ndarray:
    logits, cosines = onnx_model(x)
    return geodesic_verdict(logits, cosines, rule.angle_mean_deg, rule.angle_std_deg, rule.rho).accepted


def ood_table(onnx_model: OnnxModel, x: Tensor, rule: Rule, cfg: EvalConfig) -> list[OodResult]:
    n = min(cfg.n_ood, len(x)) if cfg.n_ood else len(x)
    source = x[:n]
    rows = []
    for i, kind in enumerate(KINDS):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + i)
        images = make_outliers(kind, source, g)
        rows.append(OodResult(kind=kind, trained=kind in TRAINED, n_examples=n,
                              reject_rate=float((~_accepted(onnx_model, images, rule)).mean())))
    return rows


def distal_starts(shape: tuple[int, ...], n: int, seed: int) -> dict[str, Tensor]:
    """n uniform-noise images and n constant images (gray levels spread over [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.linspace(0, 1, n).view(-1, *([1] * len(shape)))
    return {"uniform_noise": torch.rand((n, *shape), generator=g),
            "constant": levels.expand(n, *shape).contiguous()}


def distal_table(model: nn.Module, onnx_model: OnnxModel, shape: tuple[int, ...], rule: Rule, cfg: EvalConfig,
                 say: Callable[[str], None]) -> list[DistalResult]:
    """The distal attack (white-box: it needs the PyTorch model; without one the report says why in
    `distal_skipped`)."""
    dev = next(model.parameters()).device
    rows = []
    for start, x in distal_starts(shape, cfg.n_distal, cfg.seed).items():
        before = float(_accepted(onnx_model, x, rule).mean())
        for eps in cfg.distal_eps:
            torch.manual_seed(cfg.seed)
            parts = [distal_attack(model, x[i: i + cfg.batch_size].to(dev), eps, rule, cfg.distal_steps,
                                   cfg.rule_kappa).cpu() for i in range(0, len(x), cfg.batch_size)]
            x_adv = torch.cat(parts)
            check_ball(x_adv, x, eps, f"distal {start}")
            rate = float(_accepted(onnx_model, x_adv, rule).mean())
            say(f"distal from {start} at eps {eps}: {100 * rate:.1f} % accepted (before: {100 * before:.1f} %)")
            rows.append(DistalResult(start=start, eps=eps, n_examples=len(x), accepted_rate=rate,
                                     start_accepted_rate=before,
                                     params={"steps": cfg.distal_steps, "step_size": "2.5 eps / steps",
                                             "loss": "max_k min(logit margin of k, kappa cosine slack of k)",
                                             "kappa": cfg.rule_kappa}))
    return rows
