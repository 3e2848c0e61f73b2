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

Every adversarial run is watched by the catastrophic-overfitting guard (training/guard.py),
checked from one place (`_guard`): it keeps `best/` (highest validation PGD accuracy) and stops a
collapsing run. `last/` is written every `checkpoint_every` iterations or `checkpoint_minutes`,
whichever comes first, with the optimizer and random-generator states, so `resume=True`
continues exactly. The run folder (last/, best/, final/, summary.json, sealing) is
training/run_folder.py.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from training.adversarial import adversarial_input, training_loss
from training.attacks import accuracy
from training.checkpoint import Checkpoint, init_weights, save_checkpoint
from training.config import TrainConfig, eps_at, lr_at
from training.data import Dataset
from training.distributed import DistInfo, check_ranks_agree, init_distributed, resolve_device, weights_digest
from training.guard import CatastrophicOverfitting, OverfittingGuard, RuleData
from training.models import ConvNet, ModelConfig, build_model
from training.objectives import regularizer
from training.rejection import ServedCones, rejection_loss
from training.run_folder import (
    Run,
    final_summary,
    git_commit,
    prepare_data,
    progress_metrics,
    resume_run,
    save,
    save_last,
    seal,
    seal_run_best,
    seal_stopped_run,
    write_progress,
)

__all__ = ["TrainingDidNotLearn", "prepare_data", "seal", "seal_stopped_run", "train"]

log = logging.getLogger("dsphere.train")


class TrainingDidNotLearn(Exception):
    """The run ended near chance accuracy; its result must not be exported."""


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
        init_weights(model, init_from)
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
        resume_run(run, out / "last")
    return run


def _guard_rule(cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, device: torch.device) -> RuleData | None:
    """What a rule-aware guard needs (rejection training): training images for the angle
    statistics, the validation images outside the guard's subset for ρ."""
    if cfg.mode != "rejection":
        return None
    n_stats = min(len(train_ds), cfg.guard.n_stats)
    return RuleData(train_ds.images[:n_stats].to(device), train_ds.labels[:n_stats].to(device),
                    val_ds.images[cfg.guard.n_examples:].to(device), val_ds.labels[cfg.guard.n_examples:].to(device))


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
                checked, reason = _guard(run, epoch, postfix, epoch_end=False)
                if checked:
                    last_save = time.time()
                    if reason:
                        return reason
                elif _checkpoint_due(cfg, run.it, time.time() - last_save):
                    save_last(run)
                    last_save = time.time()
            if run.it == stop_after and run.it < run.total:
                save_last(run)
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
        loss, logits = rejection_loss(run.model, run.net, x, y, eps, iteration=run.it, cfg=cfg.rejection,
                                      objective=cfg.objective, cones=run.cones)
    else:
        x_adv = adversarial_input(run.model, x, y, cfg.mode, eps, cfg.attack_steps, _step_size(cfg, eps))
        loss, logits = training_loss(run.model, run.net, x, x_adv, y, cfg.mode, adv_weight=cfg.adv_weight,
                                     trades_beta=cfg.trades_beta, iteration=run.it, objective=cfg.objective)
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


def _guard(run: Run, epoch: int, postfix: dict[str, str], epoch_end: bool) -> tuple[bool, str | None]:
    """The one place the guard is checked: every `guard.every` iterations and at each epoch's end
    (once an iteration). A check writes best/ if it is the best so far, last/ and the summary.
    Returns (checked, the reason to stop when the run collapsed)."""
    if not _guard_due(run):
        return False, None
    assert run.guard is not None
    last = run.guard.history[-1].iteration if run.guard.history else None
    if (last == run.it) if epoch_end else (run.it % run.cfg.guard.every != 0):
        return False, None
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
            save(run, "best", with_state=False)
        save_last(run)
        write_progress(run)
    return True, run.guard.collapse_reason(point)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _end_of_epoch(run: Run, epoch: int, postfix: dict[str, str], bar: tqdm) -> str | None:
    va = accuracy(run.model, run.val_ds.images.to(run.device), run.val_ds.labels.to(run.device))
    record: dict[str, Any] = {"epoch": epoch, "iteration": run.it, "val_accuracy": va,
                              "minutes": round(run.minutes, 2)}
    _, reason = _guard(run, epoch, postfix, epoch_end=True)
    if _guard_due(run):
        assert run.guard is not None
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
            save_last(run)
    return reason


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
    ckpt.metrics = {**progress_metrics(run), "val_accuracy": val_acc, "iterations": run.it,
                    "n_train": len(run.train_ds), "n_val": len(run.val_ds), "world_size": run.info.world_size,
                    "weights_sha256": digest}
    if reason is None:
        save_checkpoint(run.out / "final", run.model, ckpt, run.optimizer)
    else:
        save_last(run)
    final_summary(run, seal_run_best(run), reason)
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


