"""Export a checkpoint to the model store: `model_store/<name>/<version>/{model.onnx,
manifest.json}` (the contract with app/, schema in app/manifest.py).

Steps, each checked:
1. ONNX (opset 17, legacy exporter): one float32 input [N, C, H, W] with dynamic N,
   pixels in [0, 1]; outputs `logits` and `cosines` [N, K]. onnx.checker passes and ONNX
   Runtime matches PyTorch within 1e-4 on real test images, or export fails.
2. rho calibrated on the validation split held out from training (never the test set) to
   a target clean false-reject rate, from ONNX Runtime outputs.
3. Test-set metrics from ONNX Runtime outputs with the verdict rule of app/verdict.py
   (so anyone recomputes them from the files), and PGD figures: adversarial examples
   crafted on the PyTorch model, judged by ONNX Runtime.
4. Written to a temporary directory and renamed into place; an existing version is
   never overwritten.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from app.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAMES,
    AttackSpec,
    Calibration,
    InputSpec,
    Manifest,
    ManifestMetrics,
    OperatingPoint,
    TrainingInfo,
)
from app.verdict import Verdicts, angle_ratio, calibrate_rho, geodesic_verdict
from training.attacks import PGD, attack_dataset
from training.checkpoint import CheckpointError, load_checkpoint
from training.data import DEFAULT_EPS, load_dataset, sha256_file, train_val_split
from training.models import ConvNet

log = logging.getLogger("dsphere.export")

OPSET = 17
PARITY_ATOL = 1e-4


class ExportError(ValueError):
    """Export refused or failed a check; one line for the user."""


def export_onnx(model: ConvNet, path: Path) -> None:
    """Write model.onnx: input 'input' [N, C, H, W] -> ('logits', 'cosines')."""
    model.eval()
    dummy = torch.zeros(2, *model.config.input_shape)
    torch.onnx.export(
        model, (dummy,), str(path), input_names=["input"], output_names=list(OUTPUT_NAMES),
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}, "cosines": {0: "N"}},
        opset_version=OPSET, dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


class OnnxModel:
    """ONNX Runtime on a model.onnx, batched: (logits, cosines) as float64 arrays."""

    def __init__(self, path: Path) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor | np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
        outs = [self.session.run(list(OUTPUT_NAMES), {self.input_name: arr[i: i + batch_size].astype(np.float32)})
                for i in range(0, len(arr), batch_size)]
        return (np.concatenate([o[0] for o in outs]).astype(np.float64),
                np.concatenate([o[1] for o in outs]).astype(np.float64))


def check_parity(model: nn.Module, onnx_model: OnnxModel, x: Tensor) -> float:
    """Max |ONNX Runtime - PyTorch| over logits and cosines; raises past PARITY_ATOL."""
    with torch.no_grad():
        logits, cosines = model(x)
    o_logits, o_cos = onnx_model(x)
    diff = max(float(np.abs(o_logits - logits.double().numpy()).max()),
               float(np.abs(o_cos - cosines.double().numpy()).max()))
    if diff > PARITY_ATOL:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {diff:.2e} (> {PARITY_ATOL})")
    return diff


@dataclass(frozen=True)
class Rates:
    accuracy: float
    reject_rate: float
    accepted_accuracy: float
    defended_rate: float


def rates(v: Verdicts, y: np.ndarray) -> Rates:
    correct = v.labels == y
    accepted = v.accepted
    acc_acc = float(correct[accepted].mean()) if accepted.any() else 0.0
    return Rates(float(correct.mean()), float((~accepted).mean()), acc_acc, float((~accepted | correct).mean()))


def default_version() -> str:
    return datetime.now(UTC).strftime("%Y.%m.%d-%H%M")


def export_version(checkpoint: str | os.PathLike[str], store: str | os.PathLike[str], name: str,
                   version: str | None = None, *, target_reject_rate: float = 0.05, eps: float | None = None,
                   pgd_steps: int = 20, pgd_restarts: int = 1, n_test: int = 0, n_attack: int = 2000,
                   data_dir: str | None = None, command: str = "", seed: int = 0) -> Path:
    """Export `checkpoint` as store/name/version and return that directory."""
    version = version or default_version()
    target = Path(store) / name / version
    if target.exists():
        raise FileExistsError(f"{target} already exists; model-store versions are never overwritten")
    model, ckpt = load_checkpoint(checkpoint)
    if ckpt.learned is not True:
        why = "did not learn" if ckpt.learned is False else "is not a finished run (no final angle statistics)"
        raise CheckpointError(f"refusing to export {checkpoint}: the run {why}")
    if ckpt.angle_stats is None:
        raise CheckpointError(f"refusing to export {checkpoint}: no angle statistics")
    model.eval()
    tc = ckpt.training_config
    dataset = ckpt.dataset or tc.get("dataset", "fashion-mnist")
    eps = eps if eps is not None else DEFAULT_EPS[dataset]
    torch.manual_seed(seed)

    # the same split as training: validation held out, seed 0
    full_train = load_dataset(dataset, "train", data_dir or tc.get("data_dir"))
    _, val = train_val_split(full_train, min(int(tc.get("n_val", 5000)), len(full_train) // 10), seed=0)
    test = load_dataset(dataset, "test", data_dir or tc.get("data_dir"))
    if n_test:
        test = test.subset(slice(0, n_test))
    stats = ckpt.angle_stats
    mean, std = stats.mean_deg, stats.std_deg

    Path(store, name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=Path(store, name)))
    try:
        onnx_path = tmp / MODEL_FILE
        export_onnx(model, onnx_path)
        onnx_model = OnnxModel(onnx_path)
        diff = check_parity(model, onnx_model, test.images[:512])
        log.info("ONNX parity with PyTorch: max abs diff %.2e", diff)

        v_logits, v_cos = onnx_model(val.images)
        rho = calibrate_rho(angle_ratio(v_logits, v_cos, mean, std), target_reject_rate)
        val_reject = float((~geodesic_verdict(v_logits, v_cos, mean, std, rho).accepted).mean())
        val_reject1 = float((~geodesic_verdict(v_logits, v_cos, mean, std, 1.0).accepted).mean())
        log.info("calibrated rho %.4f on %d validation images (reject %.4f; rho=1 rejects %.4f)",
                 rho, len(val), val_reject, val_reject1)

        y = test.labels.numpy()
        t_logits, t_cos = onnx_model(test.images)
        clean = rates(geodesic_verdict(t_logits, t_cos, mean, std, rho), y)
        clean1 = rates(geodesic_verdict(t_logits, t_cos, mean, std, 1.0), y)

        n_att = min(n_attack or len(test), len(test))
        step = 2.5 * eps / pgd_steps
        t0 = time.time()
        x_adv = attack_dataset(model, PGD(eps, steps=pgd_steps, step_size=step, restarts=pgd_restarts),
                               test.images[:n_att], test.labels[:n_att])
        log.info("PGD-%d x%d on %d test images: %.0fs", pgd_steps, pgd_restarts, n_att, time.time() - t0)
        a_logits, a_cos = onnx_model(x_adv)
        adv = rates(geodesic_verdict(a_logits, a_cos, mean, std, rho), y[:n_att])
        adv1 = rates(geodesic_verdict(a_logits, a_cos, mean, std, 1.0), y[:n_att])

        cfg = model.config
        manifest = Manifest(
            name=name, version=version, created_at=datetime.now(UTC), sha256=sha256_file(onnx_path),
            class_names=list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)],
            input=InputSpec(shape=cfg.input_shape), angle_mean_deg=list(mean), angle_std_deg=list(std), rho=rho,
            calibration=Calibration(target_false_reject_rate=target_reject_rate, n_validation=len(val),
                                    validation_reject_rate=val_reject, paper_rho1_validation_reject_rate=val_reject1),
            metrics=ManifestMetrics(
                n_test=len(test), clean_accuracy=clean.accuracy, clean_reject_rate=clean.reject_rate,
                accepted_accuracy=clean.accepted_accuracy, pgd_robust_accuracy=adv.accuracy,
                pgd_reject_rate=adv.reject_rate, pgd_defended_rate=adv.defended_rate,
                pgd_attack=AttackSpec(eps=eps, steps=pgd_steps, step_size=step, restarts=pgd_restarts,
                                      n_examples=n_att),
                paper_rho1=OperatingPoint(rho=1.0, clean_reject_rate=clean1.reject_rate,
                                          accepted_accuracy=clean1.accepted_accuracy,
                                          pgd_reject_rate=adv1.reject_rate, pgd_defended_rate=adv1.defended_rate),
            ),
            training=TrainingInfo(model_config_=cfg.to_dict(), training_config=_jsonable(tc),
                                  command=ckpt.command or command, dataset=dataset, git_commit=ckpt.git_commit),
        )
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2, by_alias=True) + "\n")
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(target)  # atomic on one filesystem; fails if target appeared meanwhile
        except OSError:
            raise FileExistsError(f"{target} already exists; model-store versions are never overwritten") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s: clean accuracy %.4f, reject %.4f at rho %.3f; PGD robust %.4f, defended %.4f",
             target, clean.accuracy, clean.reject_rate, rho, adv.accuracy, adv.defended_rate)
    return target


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    import json

    return dict(json.loads(json.dumps(d, default=str)))
