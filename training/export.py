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
4. The training split's angles from ONNX Runtime, binned per class (the manifest's
   angle_histogram: what the service's page draws beside an input's angle).
5. Written to a temporary directory and renamed into place; an existing version is
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
import torch
from torch import Tensor

from app.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAMES,
    AngleHistogram,
    AttackSpec,
    Calibration,
    InputSpec,
    Manifest,
    ManifestMetrics,
    OperatingPoint,
    TrainingInfo,
)
from app.verdict import angles_deg
from training.angle_stats import angle_histogram
from training.attacks import PGD, attack_dataset
from training.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from training.data import DEFAULT_EPS, Dataset, load_dataset, sha256_file, training_splits
from training.evaluation.schema import Report
from training.judging import PARITY_ATOL, Calibrated, OnnxModel, Rates, calibrate, parity
from training.models import ConvNet
from training.report_figures import (
    ExportError,
    PgdFigures,
    check_report_target,
    pgd_from_report,
    read_report,
    report_mismatches,
    worst_case_from_report,
)
from training.rule import Rule
from training.serving_graph import ServingGraph

log = logging.getLogger("dsphere.export")

OPSET = 17


def export_onnx(model: ConvNet, path: Path) -> None:
    """Write model.onnx: input 'input' [N, C, H, W] -> ('logits', 'cosines'), the model in its
    serving form (training/serving_graph.py: the same function, cheaper to run)."""
    model.eval()
    dummy = torch.zeros(2, *model.config.input_shape)
    torch.onnx.export(
        ServingGraph(model), (dummy,), str(path), input_names=["input"], output_names=list(OUTPUT_NAMES),
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}, "cosines": {0: "N"}},
        opset_version=OPSET, dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def default_version() -> str:
    return datetime.now(UTC).strftime("%Y.%m.%d-%H%M")


def export_version(checkpoint: str | os.PathLike[str], store: str | os.PathLike[str], name: str,
                   version: str | None = None, *, target_reject_rate: float = 0.05, eps: float | None = None,
                   pgd_steps: int = 20, pgd_restarts: int = 1, n_test: int = 0, n_attack: int = 2000,
                   data_dir: str | None = None, command: str = "", seed: int = 0,
                   evaluation: str | os.PathLike[str] | None = None) -> Path:
    """Export `checkpoint` as store/name/version and return that directory. With `evaluation` (a
    report.json of `evaluate` on a byte-identical export of this checkpoint at the same eps and
    rho, e.g. in a staging store; export is deterministic) the manifest's pgd_* and worst-case
    figures come from that report, and export runs no attack of its own."""
    target = Path(store) / name / (version := version or default_version())
    if target.exists():
        raise FileExistsError(f"{target} already exists; model-store versions are never overwritten")
    model, ckpt = exportable(checkpoint)
    tc = ckpt.training_config
    dataset = ckpt.dataset or tc.get("dataset", "fashion-mnist")
    eps = eps if eps is not None else DEFAULT_EPS[dataset]
    report = read_report(evaluation, eps) if evaluation is not None else None
    torch.manual_seed(seed)

    train, val, test = export_splits(dataset, data_dir or tc.get("data_dir"), int(tc.get("n_val", 5000)),
                                     int(tc.get("limit_train", 0)), n_test)
    assert ckpt.angle_stats is not None  # exportable() refuses a checkpoint without
    mean, std = ckpt.angle_stats.mean_deg, ckpt.angle_stats.std_deg

    Path(store, name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=Path(store, name)))
    try:
        onnx_model, sha = _export_checked(model, tmp / MODEL_FILE, test.images[:512])
        calibration = calibrate_on_validation(onnx_model, val.images, mean, std, target_reject_rate)
        rho = calibration.rho
        if report is not None:
            check_report_target(report, evaluation, sha, rho)
        t_logits, t_cos = onnx_model(test.images)
        y = test.labels.numpy()
        rule = Rule.of({"angle_mean_deg": mean, "angle_std_deg": std, "rho": rho})
        clean = Rates.of_verdicts(rule.verdicts(t_logits, t_cos), y)
        pgd = pgd_from_report(report) if report is not None else pgd_at_export(
            model, onnx_model, test.images, y, rule, PGD(eps, steps=pgd_steps, restarts=pgd_restarts), n_attack)
        cfg = model.config
        manifest = Manifest(
            name=name, version=version, created_at=datetime.now(UTC), sha256=sha,
            class_names=list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)],
            input=InputSpec(shape=cfg.input_shape), angle_mean_deg=list(mean), angle_std_deg=list(std), rho=rho,
            calibration=calibration.record,
            metrics=_metrics(len(test), clean, Rates.of_verdicts(rule.verdicts(t_logits, t_cos, rho=1.0), y), pgd,
                             report),
            training=TrainingInfo(model_config_=cfg.to_dict(), training_config=_jsonable(tc),
                                  command=ckpt.command or command, dataset=dataset, git_commit=ckpt.git_commit),
            angle_histogram=training_histogram(onnx_model, train, cfg.num_classes),
        )
        if report is not None and (differ := report_mismatches(manifest.metrics, report)):
            raise ExportError(f"--evaluation {evaluation}: the manifest would not carry the report's figures: "
                              + "; ".join(differ))
        _publish(tmp, target, manifest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s: clean accuracy %.4f, reject %.4f at rho %.3f; PGD robust %.4f, defended %.4f",
             target, clean.accuracy, clean.reject_rate, rho, pgd.robust_accuracy, pgd.defended_rate)
    return target


def _export_checked(model: ConvNet, path: Path, x: Tensor) -> tuple[OnnxModel, str]:
    """model.onnx written and checked against PyTorch on x: (ONNX Runtime on it, its sha256)."""
    export_onnx(model, path)
    onnx_model = OnnxModel(path)
    diff = parity(model, onnx_model, x)
    if diff > PARITY_ATOL:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {diff:.2e} (> {PARITY_ATOL})")
    log.info("ONNX parity with PyTorch: max abs diff %.2e", diff)
    return onnx_model, sha256_file(path)


def _metrics(n_test: int, clean: Rates, clean1: Rates, pgd: PgdFigures, report: Report | None) -> ManifestMetrics:
    """The manifest's figures: clean ones measured at export, the attack ones from the report
    (or from export's own PGD), at rho and at the paper's rho = 1."""
    return ManifestMetrics(
        n_test=n_test, clean_accuracy=clean.accuracy, clean_reject_rate=clean.reject_rate,
        accepted_accuracy=clean.accepted_accuracy or 0.0, pgd_robust_accuracy=pgd.robust_accuracy,
        pgd_reject_rate=pgd.reject_rate, pgd_defended_rate=pgd.defended_rate, pgd_attack=pgd.attack,
        paper_rho1=OperatingPoint(rho=1.0, clean_reject_rate=clean1.reject_rate,
                                  accepted_accuracy=clean1.accepted_accuracy or 0.0,
                                  pgd_reject_rate=pgd.rho1_reject_rate, pgd_defended_rate=pgd.rho1_defended_rate),
        **(worst_case_from_report(report) if report is not None else {}),
    )


def _publish(tmp: Path, target: Path, manifest: Manifest) -> None:
    """The manifest beside model.onnx, then the whole folder renamed into place at once."""
    (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2, by_alias=True) + "\n")
    os.chmod(tmp, 0o755)
    try:
        tmp.rename(target)  # atomic on one filesystem; fails if target appeared meanwhile
    except OSError:
        raise FileExistsError(f"{target} already exists; model-store versions are never overwritten") from None


def exportable(checkpoint: str | os.PathLike[str]) -> tuple[ConvNet, Checkpoint]:
    """The checkpoint's model in eval mode, if its run learned and it has angle statistics."""
    model, ckpt = load_checkpoint(checkpoint)
    if ckpt.learned is not True:
        why = "did not learn" if ckpt.learned is False else "is not a finished run (no final angle statistics)"
        raise CheckpointError(f"refusing to export {checkpoint}: the run {why}")
    if ckpt.angle_stats is None:
        raise CheckpointError(f"refusing to export {checkpoint}: no angle statistics")
    return model.eval(), ckpt


def export_splits(dataset: str, data_dir: str | None, n_val: int, limit_train: int,
                  n_test: int) -> tuple[Dataset, Dataset, Dataset]:
    """The training run's own parts of the training split, (train, validation) as it made them
    (n_val held out with seed 0, its limit_train first images kept), and the test set (first n_test)."""
    train, val = training_splits(dataset, data_dir, n_val)
    test = load_dataset(dataset, "test", data_dir)
    train = train.subset(slice(0, limit_train)) if limit_train else train
    return train, val, test.subset(slice(0, n_test)) if n_test else test


def training_histogram(onnx_model: OnnxModel, train: Dataset, num_classes: int) -> AngleHistogram:
    """The angle between each training image's feature and its own class weight, from ONNX Runtime
    (what the service computes), binned per class: the distribution behind angle_mean_deg/std."""
    _, cosines = onnx_model(train.images)  # (N, K)
    y = train.labels.numpy()
    return angle_histogram(angles_deg(cosines[np.arange(len(y)), y]), y, num_classes)


@dataclass(frozen=True)
class CalibrationRecord:
    rho: float
    record: Calibration


def calibrate_on_validation(onnx_model: OnnxModel, x_val: Tensor, mean: Any, std: Any,
                            target_reject_rate: float) -> CalibrationRecord:
    """rho such that the verdict rejects `target_reject_rate` of the clean validation images
    (ONNX Runtime's outputs: what the service will compute)."""
    c: Calibrated = calibrate(*onnx_model(x_val), mean, std, target_reject_rate)
    log.info("calibrated rho %.4f on %d validation images (reject %.4f; rho=1 rejects %.4f)",
             c.rho, c.n, c.reject_rate, c.rho1_reject_rate)
    return CalibrationRecord(c.rho, Calibration(target_false_reject_rate=target_reject_rate, n_validation=c.n,
                                                validation_reject_rate=c.reject_rate,
                                                paper_rho1_validation_reject_rate=c.rho1_reject_rate))


def pgd_at_export(model: ConvNet, onnx_model: OnnxModel, x: Tensor, y: np.ndarray, rule: Rule, pgd: PGD,
                  n_attack: int) -> PgdFigures:
    """PGD crafted on the PyTorch model, judged by ONNX Runtime (no evaluation report given)."""
    n_att = min(n_attack or len(x), len(x))
    t0 = time.time()
    x_adv = attack_dataset(model, pgd, x[:n_att], torch.from_numpy(y[:n_att]))
    log.info("PGD-%d x%d on %d test images: %.0fs", pgd.steps, pgd.restarts, n_att, time.time() - t0)
    a_logits, a_cos = onnx_model(x_adv)
    adv = Rates.of_verdicts(rule.verdicts(a_logits, a_cos), y[:n_att])
    adv1 = Rates.of_verdicts(rule.verdicts(a_logits, a_cos, rho=1.0), y[:n_att])
    return PgdFigures(adv.accuracy, adv.reject_rate, adv.defended_rate, adv1.reject_rate, adv1.defended_rate,
                      AttackSpec(eps=pgd.eps, steps=pgd.steps, step_size=pgd.step, restarts=pgd.restarts,
                                 n_examples=n_att))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    import json

    return dict(json.loads(json.dumps(d, default=str)))
