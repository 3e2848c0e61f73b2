"""Inputs that are not clothing at all, judged as the service would (ONNX Runtime, the served ρ):

- `ood_table`: one row per synthetic kind of training/outliers.py, the kinds rejection
  training saw and the held-out kinds it never saw, each made from the evaluation's own test
  images where the kind needs a source image (permuted, shuffled, inverted);
- `distal_table`: from uniform noise and from constant images, PGD within ε (0.1, 0.3) to get
  ANY class accepted (`DistalAttack`); the acceptance rate (lower is better).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from training.attacks import eval_mode, logits_of, project
from training.evaluation.attacks import check_ball
from training.evaluation.cache import AttackCache, cache_key
from training.evaluation.config import EvalConfig
from training.evaluation.schema import DistalResult, OodResult
from training.evaluation.served import Outputs, ServedOutputs, served_outputs
from training.evaluation.settings import JUDGED, settings
from training.judging import OnnxModel
from training.outliers import KINDS, TRAINED, make_outliers
from training.rule import Rule, rule_margins


@dataclass(frozen=True)
class DistalAttack:
    """From starting images that are not clothing (noise, constant images), PGD at radius ε
    to get ANY class accepted: it ascends max_k min(logit margin of k, κ·cosine slack of k), and
    keeps per example the best iterate (the start included) on `judge`'s outputs (model.onnx in the
    evaluation) or the model's own: accepted first, then that objective. No true label: `y` is ignored."""

    eps: float
    rule: Rule
    steps: int = 50
    kappa: float = 10.0
    judge: Outputs | None = field(default=None, repr=False)  # the served outputs iterates are judged by
    about: ClassVar[dict[str, str]] = {"step_size": "2.5 eps / steps",
                                       "loss": "max_k min(logit margin of k, kappa cosine slack of k)"}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
        eps, rule = self.eps, self.rule
        cos_thr = rule.cos_thresholds(x.device)
        step = 2.5 * eps / self.steps
        with eval_mode(model):
            x_cur = x.clone()
            best = x.clone()
            best_score = torch.full((len(x),), -float("inf"), dtype=torch.float64, device=x.device)
            for it in range(self.steps + 1):
                x_cur = x_cur.detach().requires_grad_(True)
                logits, cosines = logits_of(model, x_cur)
                assert cosines is not None
                obj = rule_margins(logits, cosines, cos_thr, self.kappa).amax(1)
                with torch.no_grad():
                    lg, cs = served_outputs(self.judge, x_cur, logits, cosines)
                    accepted = torch.from_numpy(rule.verdicts(lg, cs).accepted).to(x.device)
                    score = rule_margins(lg, cs, cos_thr, self.kappa).amax(1).double() + 1e6 * accepted
                    keep = score > best_score
                    best[keep], best_score[keep] = x_cur.detach()[keep], score[keep]
                if it == self.steps:
                    break
                (g,) = torch.autograd.grad(obj.sum(), x_cur)
                x_cur = project(x_cur.detach() + step * g.sign(), x, eps)
        return best.detach()


def _accepted(onnx_model: OnnxModel, x: Tensor, rule: Rule) -> np.ndarray:
    return rule.verdicts(*onnx_model(x)).accepted


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
                 say: Callable[[str], None], cache: AttackCache, model_sha256: str) -> list[DistalResult]:
    """The distal attack (white-box: it needs the PyTorch model; without one the report says why in
    `distal_skipped`); each run kept in `cache` (an interrupted evaluation resumes)."""
    dev = next(model.parameters()).device
    rows = []
    for start, x in distal_starts(shape, cfg.n_distal, cfg.seed).items():
        before = float(_accepted(onnx_model, x, rule).mean())
        for eps in cfg.distal_eps:
            attack = DistalAttack(eps, rule, cfg.distal_steps, cfg.rule_kappa, judge=ServedOutputs(onnx_model))

            def make(attack: DistalAttack = attack, x: Tensor = x, start: str = start) -> Tensor:
                torch.manual_seed(cfg.seed)
                parts = [attack(model, x[i: i + cfg.batch_size].to(dev)).cpu()
                         for i in range(0, len(x), cfg.batch_size)]
                x_adv = torch.cat(parts)
                check_ball(x_adv, x, attack.eps, f"distal {start}")
                return x_adv

            key = cache_key(model_sha256, "distal", start, settings(attack), list(shape), cfg.n_distal, cfg.seed)
            x_adv = cache.made(f"distal-{start}", key, make)
            rate = float(_accepted(onnx_model, x_adv, rule).mean())
            say(f"distal from {start} at eps {eps}: {100 * rate:.1f} % accepted (before: {100 * before:.1f} %)")
            rows.append(DistalResult(start=start, eps=eps, n_examples=len(x), accepted_rate=rate,
                                     start_accepted_rate=before, params={**settings(attack), **JUDGED}))
    return rows
