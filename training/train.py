"""The training loop: natural, FGSM (random start), PGD, N-FGSM or TRADES adversarial
training (what each mode minimizes: training/adversarial.py), on one process or under
`torchrun` (DistributedDataParallel: gloo on CPU, nccl on GPU).

The configuration and its lr/ε schedules: training/config.py; device and torchrun:
training/distributed.py.

Remedies for adversarial training that does not start (PGD from scratch sits at chance on
a cosine D-SphereNet): `natural_epochs` of natural training first, then a linear ε warm-up
over `eps_warmup_epochs`. A run whose validation accuracy stays near chance is reported as
"did not learn" (TrainingDidNotLearn) and its final checkpoint is marked learned=false,
which export refuses.

Every adversarial run is watched by the catastrophic-overfitting guard (training/guard.py):
it keeps `best/` (highest validation PGD accuracy) and stops a collapsing run. `last/` is
written every `checkpoint_every` iterations or `checkpoint_minutes`, whichever comes first,
with the optimizer and random-generator states, so `resume=True` continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from training.adversarial import adversarial_input, training_loss
from training.angle_stats import compute_angle_stats
from training.attacks import accuracy
from training.checkpoint import Checkpoint, load_checkpoint, load_optimizer_state, restore_rng, save_checkpoint
from training.config import TrainConfig, as_ran, eps_at, lr_at
from training.data import Dataset, training_splits
from training.distributed import DistInfo, check_ranks_agree, init_distributed, resolve_device, weights_digest
from training.guard import CatastrophicOverfitting, GuardPoint, OverfittingGuard, RuleData
from training.models import ConvNet, ModelConfig, build_model
from training.objectives import regularizer
from training.portable import portable_path
from training.rejection import ServedCones, rejection_loss

log = logging.getLogger("dsphere.train")


class TrainingDidNotLearn(Exception):
    """The run ended near chance accuracy; its result must not be exported."""


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


def train(model_cfg: ModelConfig, cfg: TrainConfig, out_dir: str | os.PathLike[str], resume: bool = False,
          command: str = "", init_from: str | None = None, show_progress: bool = True,
          stop_after: int | None = None) -> tuple[ConvNet, Checkpoint]:
    """Train; write out_dir/last periodically, out_dir/best in adversarial runs, then
    out_dir/final and summary.json. `stop_after` ends the run at that iteration with last/
    written, exactly as an interruption would (tests, time-boxed sessions)."""
    run = _start(model_cfg, cfg, Path(out_dir), resume, command, init_from)
    reason = _loop(run, show_progress, stop_after)
    if reason is None and run.it < run.total:
        return run.model, run.ckpt
    return _finish(run, reason)


def _start(model_cfg: ModelConfig, cfg: TrainConfig, out: Path, resume: bool, command: str,
           init_from: str | None) -> Run:
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    torch.manual_seed(cfg.seed)
    train_ds, val_ds = prepare_data(cfg)
    if not model_cfg.class_names:
        model_cfg = replace(model_cfg, class_names=train_ds.class_names)
    if model_cfg.input_shape != train_ds.input_shape:
        model_cfg = replace(model_cfg, input_shape=train_ds.input_shape)

    model = build_model(model_cfg)
    resuming = resume and (out / "last").is_dir()
    if init_from and not resuming:  # a resumed run takes its weights from last/ (init_from may be gone)
        _init_weights(model, init_from)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    iters_per_epoch = max(1, len(train_ds) // info.world_size // cfg.batch_size)
    total = int(math.ceil(cfg.epochs * iters_per_epoch)) if cfg.epochs > 0 else cfg.iterations
    ckpt = Checkpoint(model_cfg, cfg.to_dict(), command=command, dataset=cfg.dataset, git_commit=git_commit())
    guard = (OverfittingGuard(cfg.guard, val_ds.images.to(device), val_ds.labels.to(device), cfg.eps,
                              rule=_guard_rule(cfg, train_ds, val_ds, device))
             if cfg.adversarial else None)
    net: nn.Module = model
    if info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(cfg, out, device, info, model, net, optimizer, train_ds, val_ds, iters_per_epoch, total, ckpt, guard)
    if cfg.mode == "rejection":
        run.cones = ServedCones(cfg.rejection, model_cfg.num_classes, train_ds.images.to(device),
                                train_ds.labels.to(device))
    if resuming:
        _resume(run, out / "last")
    return run


def _init_weights(model: ConvNet, init_from: str) -> None:
    """Start from a checkpoint of the same model, or of the same trunk with another head (its
    class weights are kept, a bias it had is dropped: e.g. a softmax baseline fine-tuned with a
    cosine head)."""
    src, _ = load_checkpoint(init_from)
    mine, theirs = model.config.to_dict(), src.config.to_dict()
    mine.pop("head"), theirs.pop("head")
    if mine != theirs:
        raise ValueError(f"--init-from {init_from}: its model config differs from the requested one")
    state = src.state_dict()
    if src.config.head != model.config.head:
        wanted = model.state_dict()
        state = {k: v for k, v in state.items() if k in wanted and wanted[k].shape == v.shape}
        log.info("--init-from %s: head %s -> %s; %d of %d tensors taken", init_from, src.config.head,
                 model.config.head, len(state), len(wanted))
        model.load_state_dict(state, strict=False)
        return
    model.load_state_dict(state)


def _guard_rule(cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, device: torch.device) -> RuleData | None:
    """What a rule-aware guard needs (rejection training): training images for the angle
    statistics, the validation images outside the guard's subset for ρ."""
    if cfg.mode != "rejection":
        return None
    n_stats = min(len(train_ds), cfg.guard.n_stats)
    return RuleData(train_ds.images[:n_stats].to(device), train_ds.labels[:n_stats].to(device),
                    val_ds.images[cfg.guard.n_examples:].to(device), val_ds.labels[cfg.guard.n_examples:].to(device))


def _resume(run: Run, last: Path) -> None:
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


def _loop(run: Run, show_progress: bool, stop_after: int | None) -> str | None:
    """Train until the end, `stop_after`, or a collapse (whose reason it returns)."""
    cfg, ipe = run.cfg, run.iters_per_epoch
    bar = tqdm(total=run.total, initial=run.it, disable=not (show_progress and run.info.is_main), unit="it",
               dynamic_ncols=True, file=sys.stderr)
    postfix: dict[str, str] = {}
    last_save = time.time()
    try:
        while run.it < run.total:
            epoch = run.it // ipe
            order = _epoch_order(cfg, epoch, len(run.train_ds), run.info)[: ipe * cfg.batch_size]
            for b in range(run.it - epoch * ipe, ipe):
                if run.it >= run.total or run.it == stop_after:
                    break
                idx = order[b * cfg.batch_size: (b + 1) * cfg.batch_size]
                postfix.update(_step(run, run.train_ds.images[idx].to(run.device),
                                     run.train_ds.labels[idx].to(run.device)))
                postfix["epoch"] = str(epoch)
                bar.update(1)
                bar.set_postfix(postfix)
                if _guard_due(run) and run.it % cfg.guard.every == 0:
                    reason = _check(run, epoch, postfix)
                    last_save = time.time()
                    if reason:
                        return reason
                elif _checkpoint_due(cfg, run.it, time.time() - last_save):
                    _save_last(run)
                    last_save = time.time()
            if run.it == stop_after and run.it < run.total:
                _save_last(run)
                return None
            reason = _end_of_epoch(run, epoch, postfix, bar)
            if reason:
                return reason
    finally:
        bar.close()
    return None


def _checkpoint_due(cfg: TrainConfig, iteration: int, seconds_since_last: float) -> bool:
    """Every `checkpoint_every` iterations or `checkpoint_minutes`, whichever comes first (0 = off)."""
    return bool((cfg.checkpoint_every and iteration % cfg.checkpoint_every == 0)
                or (cfg.checkpoint_minutes > 0 and seconds_since_last > 60 * cfg.checkpoint_minutes))


def _epoch_order(cfg: TrainConfig, epoch: int, n: int, info: DistInfo) -> Tensor:
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)  # the same order on every rank
    return torch.randperm(n, generator=g)[info.rank::info.world_size]


def _step(run: Run, x: Tensor, y: Tensor) -> dict[str, str]:
    """One optimizer step; returns the progress-bar fields it updates."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.it, run.total, cfg)
    eps = eps_at(run.it, run.iters_per_epoch, cfg)
    if run.cones is not None:
        if eps > 0 and run.cones.due(run.it):
            run.cones.refresh(run.model, run.it)
        loss, logits = rejection_loss(run.model, run.net, x, y, eps, run.it, cfg.rejection, cfg.objective, run.cones)
    else:
        x_adv = adversarial_input(run.model, x, y, cfg.mode, eps, cfg.attack_steps, _step_size(cfg, eps))
        loss, logits = training_loss(run.model, run.net, x, x_adv, y, cfg.mode, cfg.adv_weight, cfg.trades_beta,
                                     run.it, cfg.objective)
    loss = loss + regularizer(run.model, cfg.objective).to(run.device)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.it += 1
    return {"loss": f"{loss.item():.3f}", "acc": f"{float((logits.argmax(1) == y).float().mean()):.3f}",
            "eps": f"{eps:.3f}"}


def _step_size(cfg: TrainConfig, eps: float) -> float | None:
    """--attack-step-size scaled with ε during the warm-up (None: each attack's default)."""
    return cfg.attack_step_size * eps / cfg.eps if cfg.attack_step_size else None


def _guard_due(run: Run) -> bool:
    """The guard watches an adversarial run once its natural phase is over."""
    return run.guard is not None and eps_at(run.it - 1, run.iters_per_epoch, run.cfg) > 0


def _check(run: Run, epoch: int, postfix: dict[str, str]) -> str | None:
    """One guard check: best/ if it is the best so far, last/, the summary; a collapse's reason."""
    assert run.guard is not None
    point = run.guard.measure(run.model, run.it, epoch)
    best = run.guard.best
    postfix.update(pgd=f"{point.pgd_accuracy:.3f}", best=f"{best.score:.3f}" if best else "-")
    if point.defended_rate is not None:
        postfix.update(defended=f"{point.defended_rate:.3f}")
    log.info("guard at iteration %d: validation PGD-%d accuracy %.4f (clean %.4f), defended %s (rho %s, clean "
             "reject %s); best %.4f", run.it, run.cfg.guard.steps, point.pgd_accuracy, point.clean_accuracy,
             _fmt(point.defended_rate), _fmt(point.rho), _fmt(point.clean_reject_rate),
             best.score if best else float("nan"))
    if run.info.is_main:
        if best is point:
            _save(run, "best", with_state=False)
        _save_last(run)
        _write_summary(run, status="running")
    return run.guard.collapse_reason(point)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _end_of_epoch(run: Run, epoch: int, postfix: dict[str, str], bar: tqdm) -> str | None:
    va = accuracy(run.model, run.val_ds.images.to(run.device), run.val_ds.labels.to(run.device))
    record: dict[str, Any] = {"epoch": epoch, "iteration": run.it, "val_accuracy": va,
                              "minutes": round(run.minutes, 2)}
    reason = None
    if _guard_due(run):
        assert run.guard is not None
        if not run.guard.history or run.guard.history[-1].iteration != run.it:
            reason = _check(run, epoch, postfix)
        record["val_pgd_accuracy"] = run.guard.history[-1].pgd_accuracy
        if run.guard.history[-1].defended_rate is not None:
            record["val_defended_rate"] = run.guard.history[-1].defended_rate
    run.epochs.append(record)
    pgd = f"  val PGD-{run.cfg.guard.steps} accuracy {record['val_pgd_accuracy']:.4f}" if "val_pgd_accuracy" in record \
        else ""
    if "val_defended_rate" in record:
        pgd += f", defended {record['val_defended_rate']:.4f}"
    log.info("epoch %d: iteration %d/%d, val accuracy %.4f%s, %.1f min", epoch, run.it, run.total, va, pgd,
             run.minutes)
    if run.info.is_main:
        bar.write(f"epoch {epoch}: iteration {run.it}/{run.total}  val accuracy {va:.4f}{pgd}  ({run.minutes:.1f} min)")
        if run.it < run.total:
            _save_last(run)
    return reason


def _progress_metrics(run: Run) -> dict[str, Any]:
    metrics = {**run.ckpt.metrics, "epochs": run.epochs, "train_minutes": round(run.minutes, 2)}
    if run.guard is not None:
        metrics["guard"] = run.guard.to_list()
    if run.cones is not None and run.cones.state() is not None:
        metrics["served_cones"] = run.cones.state()
    return metrics


def _save(run: Run, name: str, with_state: bool) -> None:
    run.ckpt.iteration, run.ckpt.epoch = run.it, run.it // run.iters_per_epoch
    run.ckpt.metrics = _progress_metrics(run)
    save_checkpoint(run.out / name, run.model, run.ckpt, run.optimizer if with_state else None, rng=with_state)


def _save_last(run: Run) -> None:
    if run.info.is_main:
        _save(run, "last", with_state=True)


def _finish(run: Run, reason: str | None) -> tuple[ConvNet, Checkpoint]:
    """Final checks and files: final/ (unless the guard stopped the run), best/ made
    exportable, summary.json; raises if the run did not learn or collapsed."""
    digest = weights_digest(run.model)
    if run.info.world_size > 1:
        check_ranks_agree(run.info, digest, run.out)
        if not run.info.is_main:
            dist.barrier()
            return run.model, run.ckpt
    cfg, ckpt = run.cfg, run.ckpt
    val_acc = seal(run.model, ckpt, run.cfg, run.train_ds, run.val_ds, run.device)
    ckpt.metrics = {**_progress_metrics(run), "val_accuracy": val_acc, "iterations": run.it,
                    "n_train": len(run.train_ds), "n_val": len(run.val_ds), "world_size": run.info.world_size,
                    "weights_sha256": digest}
    if reason is None:
        save_checkpoint(run.out / "final", run.model, ckpt, run.optimizer)
    else:
        _save_last(run)
    best = _seal_best(run)
    summary = {"learned": ckpt.learned, **ckpt.metrics, "checkpoint": portable_path(run.out / "final"),
               "angle_mean_deg": list(ckpt.angle_stats.mean_deg) if ckpt.angle_stats else None,
               "angle_std_deg": list(ckpt.angle_stats.std_deg) if ckpt.angle_stats else None,
               "best": best, "stopped": reason}
    _write_summary(run, summary=summary)
    if run.info.world_size > 1:
        dist.barrier()
    if reason is not None:
        raise CatastrophicOverfitting(reason)
    if not ckpt.learned:
        chance = 1.0 / run.model.config.num_classes
        raise TrainingDidNotLearn(
            f"the run did not learn: validation accuracy {val_acc:.3f} is within "
            f"{cfg.min_accuracy_over_chance:.2f} of chance ({chance:.2f}); checkpoint marked learned=false "
            f"(try --natural-epochs and --eps-warmup-epochs)")
    return run.model, ckpt


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


def _seal_best(run: Run) -> dict[str, Any] | None:
    """Give best/ its angle statistics and learned flag, so that export can take it."""
    best_dir = run.out / "best"
    if run.guard is None or run.guard.best is None or not best_dir.is_dir():
        return None
    model, ckpt = load_checkpoint(best_dir)
    model.to(run.device)
    val_acc = seal(model, ckpt, run.cfg, run.train_ds, run.val_ds, run.device)
    point: GuardPoint = run.guard.best
    ckpt.metrics = {**ckpt.metrics, "val_accuracy": val_acc, "best": asdict(point)}
    save_checkpoint(best_dir, model, ckpt)
    return {"checkpoint": portable_path(best_dir), **asdict(point), "val_accuracy": val_acc, "learned": ckpt.learned}


def _write_summary(run: Run, status: str = "", summary: dict[str, Any] | None = None) -> None:
    """summary.json: the final one, or the progress so far (guard curve, epochs)."""
    if summary is None:
        best = run.guard.best if run.guard else None
        summary = {"status": status, "iteration": run.it, "total_iterations": run.total,
                   **_progress_metrics(run), "best": asdict(best) if best else None}
    run.out.mkdir(parents=True, exist_ok=True)
    tmp = run.out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(run.out / "summary.json")


def seal_stopped_run(run_dir: str | os.PathLike[str], reason: str) -> Path:
    """Make the best/ of a run stopped for good before its end exportable, as the end of the
    run would have: its angle statistics on the training split and its learned flag, the
    guard's point in its metrics; summary.json records why the run was stopped."""
    out = Path(run_dir)
    best_dir = out / "best"
    model, ckpt = load_checkpoint(best_dir)
    cfg = TrainConfig.from_dict(ckpt.training_config)
    val_acc = seal(model, ckpt, cfg, *prepare_data(cfg))
    points = [GuardPoint(**h) for h in ckpt.metrics.get("guard", [])]
    best = max(points, key=lambda p: p.score, default=None)
    ckpt.metrics = {**ckpt.metrics, "val_accuracy": val_acc, "best": asdict(best) if best else None}
    save_checkpoint(best_dir, model, ckpt)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(status="stopped", stopped=reason, learned=ckpt.learned,
                   best={"checkpoint": portable_path(best_dir), **(asdict(best) if best else {}),
                         "val_accuracy": val_acc, "learned": ckpt.learned})
    summary_path.write_text(json.dumps(summary, indent=2))
    return best_dir
