"""Judging a model, defined once: ONNX Runtime on a model.onnx, its parity with PyTorch, the
verdict rates, and ρ calibration. Export, evaluation, reproduce, the sanity checks and the
guard all call this module; the verdict rule itself is app.verdict (shared with the service).

Rates, as fractions of the judged inputs: accuracy (label correct, rejection ignored), reject
rate, accuracy on the accepted inputs, defended rate (rejected OR correct) and success rate
(accepted AND wrong = 1 − defended: the attacker's win).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor, nn

from app.runtimes import Runner, onnxruntime_runner
from app.verdict import Verdicts, calibrate_rho_on, geodesic_verdict

# ONNX Runtime and PyTorch must agree this closely on logits and cosines (export refuses a graph
# that does not; evaluation refuses a checkpoint that does not belong to the version).
PARITY_ATOL = 1e-4


class BatchedRunner:
    """A model runner (app.runtimes: x -> (logits, cosines), the service's own) called in batches:
    (logits, cosines) as float64 arrays."""

    def __init__(self, runner: Runner, batch_size: int = 1000) -> None:
        self.runner, self.batch_size = runner, batch_size

    def __call__(self, x: Tensor | np.ndarray, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        arr = (x.detach().cpu().numpy() if isinstance(x, Tensor) else x).astype(np.float32)
        b = batch_size or self.batch_size
        outs = [self.runner(np.ascontiguousarray(arr[i: i + b])) for i in range(0, len(arr), b)]
        return (np.concatenate([o[0] for o in outs]).astype(np.float64),
                np.concatenate([o[1] for o in outs]).astype(np.float64))


class OnnxModel(BatchedRunner):
    """ONNX Runtime on a model.onnx, the fp32 reference, batched."""

    def __init__(self, path: Path) -> None:
        super().__init__(onnxruntime_runner(str(path), quiet=True))


def parity(model: nn.Module, onnx_model: OnnxModel, x: Tensor) -> float:
    """Max |ONNX Runtime − PyTorch| over logits and cosines on x (the model in eval mode).
    Callers compare it with PARITY_ATOL and refuse in their own words."""
    model.eval()
    with torch.no_grad():
        logits, cosines = model(x)
    o_logits, o_cos = onnx_model(x)
    return max(float(np.abs(o_logits - logits.double().cpu().numpy()).max()),
               float(np.abs(o_cos - cosines.double().cpu().numpy()).max()))


@dataclass(frozen=True)
class Rates:
    accuracy: float
    reject_rate: float
    accepted_accuracy: float | None  # None when nothing was accepted
    defended_rate: float
    success_rate: float

    @classmethod
    def of(cls, correct: ArrayLike, accepted: ArrayLike) -> Rates:
        c, a = np.asarray(correct, bool), np.asarray(accepted, bool)
        return cls(accuracy=float(c.mean()), reject_rate=float((~a).mean()),
                   accepted_accuracy=float(c[a].mean()) if a.any() else None,
                   defended_rate=float((~a | c).mean()), success_rate=float((a & ~c).mean()))

    @classmethod
    def of_verdicts(cls, v: Verdicts, y: ArrayLike) -> Rates:
        return cls.of(v.labels == np.asarray(y), v.accepted)


@dataclass(frozen=True)
class Calibrated:
    rho: float
    n: int
    reject_rate: float  # of the calibration inputs at rho
    rho1_reject_rate: float  # at the paper's rho = 1


def calibrate(logits: np.ndarray, cosines: np.ndarray, mean: Any, std: Any, target_reject_rate: float) -> Calibrated:
    """ρ such that the verdict rejects at most `target_reject_rate` of these (clean,
    validation) outputs, exactly as the service computes verdicts (app.verdict)."""
    rho = calibrate_rho_on(logits, cosines, mean, std, target_reject_rate)
    at = float((~geodesic_verdict(logits, cosines, mean, std, rho).accepted).mean())
    at1 = float((~geodesic_verdict(logits, cosines, mean, std, 1.0).accepted).mean())
    return Calibrated(rho, len(logits), at, at1)
