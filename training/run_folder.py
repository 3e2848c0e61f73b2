"""A training run's folder, and what one run carries from step to step (`Run`):

- `last/` (weights, optimizer and random-generator states: `resume` continues exactly), `best/`
  (the guard's best point), `final/`; each written by training/checkpoint.py, whole or not at all;
- `summary.json`: the progress so far (status "running", the guard's curve, the epochs), then the
  run's end (`final_summary`) or why it was stopped for good (`seal_stopped_run`), written atomically;
- `seal`: whether a model learned and its angle statistics, given to final/ and to best/ so that
  export can take either.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.angle_stats import compute_angle_stats
from training.attacks import accuracy
from training.checkpoint import Checkpoint, load_checkpoint, load_optimizer_state, restore_rng, save_checkpoint
from training.config import TrainConfig, as_ran
from training.data import Dataset, training_splits
from training.distributed import DistInfo
from training.files import write_json
from training.guard import GuardPoint, OverfittingGuard
from training.models import ConvNet
from training.portable import portable_path
from training.rejection import ServedCones

log = logging.getLogger("dsphere.train")

SUMMARY = "summary.json"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_data(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    train, val = training_splits(cfg.dataset, cfg.data_dir, cfg.n_val)
    if cfg.limit_train:
        train = train.subset(slice(0, cfg.limit_train))
    return train, val


@dataclass
class Run:
    """What one training run carries from step to step."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    info: DistInfo
    model: ConvNet
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    train_ds: Dataset
    val_ds: Dataset
    iters_per_epoch: int
    total: int
    ckpt: Checkpoint
    guard: OverfittingGuard | None
    cones: ServedCones | None = None  # rejection training: the cones it rejects outside of
    it: int = 0
    epochs: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.time)
    minutes_before: float = 0.0  # training time of the run's earlier, interrupted parts

    @property
    def minutes(self) -> float:
        return self.minutes_before + (time.time() - self.t0) / 60


def resume_run(run: Run, last: Path) -> None:
    """Continue from last/: weights, optimizer, random generators, the progress and the guard's
    history, the served cones; refused when last/ was written with other training options."""
    loaded, prev = load_checkpoint(last)
    if _canonical(as_ran(prev.training_config)) != _canonical(run.cfg.to_dict()):
        raise ValueError(f"--resume: {last} was written with other training options; "
                         f"repeat that run's command (checkpoint.json 'command': {prev.command})")
    run.model.load_state_dict(loaded.state_dict())
    load_optimizer_state(last, run.optimizer)
    restore_rng(last)
    run.it = prev.iteration
    run.ckpt.metrics = dict(prev.metrics)
    run.epochs = list(prev.metrics.get("epochs", []))
    run.minutes_before = float(prev.metrics.get("train_minutes", 0.0))
    if run.guard is not None:
        run.guard.history = [GuardPoint(**h) for h in prev.metrics.get("guard", [])]
    if run.cones is not None:
        run.cones.load(prev.metrics.get("served_cones"), run.device)
    log.info("resumed from %s at iteration %d", last, run.it)


def _canonical(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def progress_metrics(run: Run) -> dict[str, Any]:
    metrics = {**run.ckpt.metrics, "epochs": run.epochs, "train_minutes": round(run.minutes, 2)}
    if run.guard is not None:
        metrics["guard"] = run.guard.to_list()
    if run.cones is not None and run.cones.state() is not None:
        metrics["served_cones"] = run.cones.state()
    return metrics


def save(run: Run, name: str, with_state: bool) -> None:
    run.ckpt.iteration, run.ckpt.epoch = run.it, run.it // run.iters_per_epoch
    run.ckpt.metrics = progress_metrics(run)
    save_checkpoint(run.out / name, run.model, run.ckpt, run.optimizer if with_state else None, rng=with_state)


def save_last(run: Run) -> None:
    if run.info.is_main:
        save(run, "last", with_state=True)


def write_progress(run: Run) -> None:
    """summary.json while the run goes on: the progress so far (guard curve, epochs)."""
    best = run.guard.best if run.guard else None
    write_json(run.out / SUMMARY, {"status": "running", "iteration": run.it, "total_iterations": run.total,
                                   **progress_metrics(run), "best": asdict(best) if best else None})


def final_summary(run: Run, best: dict[str, Any] | None, stopped: str | None) -> None:
    """summary.json at the run's end (run.ckpt holds the final metrics and angle statistics)."""
    ckpt = run.ckpt
    write_json(run.out / SUMMARY, {
        "learned": ckpt.learned, **ckpt.metrics, "checkpoint": portable_path(run.out / "final"),
        "angle_mean_deg": list(ckpt.angle_stats.mean_deg) if ckpt.angle_stats else None,
        "angle_std_deg": list(ckpt.angle_stats.std_deg) if ckpt.angle_stats else None,
        "best": best, "stopped": stopped})


def seal(model: ConvNet, ckpt: Checkpoint, cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset,
         device: torch.device | None = None) -> float:
    """Whether a model learned, and its angle statistics on the training split (into ckpt);
    returns its validation accuracy."""
    model.eval()
    val_acc = accuracy(model, val_ds.images.to(device), val_ds.labels.to(device))
    ckpt.learned = val_acc >= 1.0 / model.config.num_classes + cfg.min_accuracy_over_chance
    ckpt.angle_stats = compute_angle_stats(model, train_ds.images.to(device), train_ds.labels.to(device),
                                           model.config.num_classes)
    return val_acc


def seal_best(best_dir: Path, point: GuardPoint | None, cfg: TrainConfig, data: tuple[Dataset, Dataset],
              device: torch.device | None = None) -> dict[str, Any]:
    """Give best/ its angle statistics, learned flag and guard point, so that export can take it;
    returns the summary's "best" entry."""
    model, ckpt = load_checkpoint(best_dir)
    if device is not None:
        model.to(device)
    val_acc = seal(model, ckpt, cfg, *data, device)
    ckpt.metrics = {**ckpt.metrics, "val_accuracy": val_acc, "best": asdict(point) if point else None}
    save_checkpoint(best_dir, model, ckpt)
    return {"checkpoint": portable_path(best_dir), **(asdict(point) if point else {}), "val_accuracy": val_acc,
            "learned": ckpt.learned}


def seal_run_best(run: Run) -> dict[str, Any] | None:
    """best/ of a run at its end, when the guard kept one."""
    best_dir = run.out / "best"
    if run.guard is None or run.guard.best is None or not best_dir.is_dir():
        return None
    return seal_best(best_dir, run.guard.best, run.cfg, (run.train_ds, run.val_ds), run.device)


def seal_stopped_run(run_dir: str | os.PathLike[str], reason: str) -> Path:
    """Make the best/ of a run stopped for good before its end exportable, as the end of the
    run would have: its angle statistics on the training split and its learned flag, the
    guard's point in its metrics; summary.json records why the run was stopped."""
    out = Path(run_dir)
    best_dir = out / "best"
    _, ckpt = load_checkpoint(best_dir)
    cfg = TrainConfig.from_dict(ckpt.training_config)
    points = [GuardPoint(**h) for h in ckpt.metrics.get("guard", [])]
    best = seal_best(best_dir, max(points, key=lambda p: p.score, default=None), cfg, prepare_data(cfg))
    summary_path = out / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(status="stopped", stopped=reason, learned=best["learned"], best=best)
    write_json(summary_path, summary)
    return best_dir
