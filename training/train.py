"""The training loop: natural, FGSM (random start) or PGD adversarial training, on one
process or under `torchrun` (DistributedDataParallel: gloo on CPU, nccl on GPU).

Schedule (paper §5, scaled to the run's length): Adam, lr 1e-3, divided by 10 after 1/3
and 2/3 of the iterations (the paper's MNIST run: /10 at 10k and 20k, stop at 30k).

Remedies for adversarial training that does not start (PGD from scratch sits at chance on
a cosine D-SphereNet): `natural_epochs` of natural training first, then a linear ε warm-up
over `eps_warmup_epochs`. A run whose validation accuracy stays near chance is reported as
"did not learn" (TrainingDidNotLearn) and its final checkpoint is marked learned=false,
which export refuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from training.angle_stats import compute_angle_stats
from training.attacks import FGSM, PGD, predict
from training.checkpoint import Checkpoint, load_checkpoint, load_optimizer_state, save_checkpoint
from training.data import Dataset, load_dataset, train_val_split
from training.models import ConvNet, ModelConfig, build_model
from training.objectives import ObjectiveConfig, head_loss, regularizer

log = logging.getLogger("dsphere.train")

MODES = ("natural", "fgsm", "pgd")


class TrainingDidNotLearn(Exception):
    """The run ended near chance accuracy; its result must not be exported."""


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    mode: str = "natural"
    eps: float = 0.1
    attack_steps: int = 7
    attack_step_size: float | None = None  # default 2.5 ε / steps (PGD), 1.25 ε (FGSM-RS)
    adv_weight: float = 1.0  # loss = (1-w) CE(clean) + w CE(adv); 1.0 = pure adversarial
    natural_epochs: float = 0.0  # natural training before the adversarial phase
    eps_warmup_epochs: float = 0.0  # linear ramp of ε after the natural phase
    epochs: float = 0.0  # if > 0, overrides iterations
    iterations: int = 30000  # the paper's MNIST schedule
    batch_size: int = 128
    lr: float = 1e-3
    lr_milestones: tuple[float, ...] = (1 / 3, 2 / 3)
    n_val: int = 5000
    limit_train: int = 0  # train on the first N examples of the training split (smoke runs)
    seed: int = 0
    checkpoint_every: int = 500
    device: str = "auto"
    min_accuracy_over_chance: float = 0.15
    objective: ObjectiveConfig = ObjectiveConfig()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown training mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not 0 <= self.adv_weight <= 1:
            raise ValueError("adv_weight must be in [0, 1]")
        if self.eps < 0:
            raise ValueError("eps must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["objective"] = ObjectiveConfig(**d.get("objective", {}))
        d["lr_milestones"] = tuple(d.get("lr_milestones", (1 / 3, 2 / 3)))
        return cls(**d)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA requested but not available; falling back to CPU")
        return torch.device("cpu")
    return torch.device(name)


def init_distributed(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size())


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def lr_at(iteration: int, total: int, cfg: TrainConfig) -> float:
    drops = sum(iteration >= m * total for m in cfg.lr_milestones)
    return cfg.lr * (0.1**drops)


def eps_at(iteration: int, iters_per_epoch: int, cfg: TrainConfig) -> float:
    """0 during the natural phase, then a linear ramp to ε over the warm-up."""
    start = cfg.natural_epochs * iters_per_epoch
    if iteration < start:
        return 0.0
    warm = cfg.eps_warmup_epochs * iters_per_epoch
    if warm <= 0:
        return cfg.eps
    return cfg.eps * min(1.0, (iteration - start + 1) / warm)


def adversarial_batch(model: nn.Module, x: Tensor, y: Tensor, eps: float, cfg: TrainConfig) -> Tensor:
    if cfg.mode == "natural" or eps <= 0:
        return x
    if cfg.mode == "fgsm":
        fgsm_step = cfg.attack_step_size and cfg.attack_step_size * eps / cfg.eps
        return FGSM(eps, random_start=True, step_size=fgsm_step)(model, x, y)
    step = cfg.attack_step_size * eps / cfg.eps if cfg.attack_step_size else None
    return PGD(eps, steps=cfg.attack_steps, step_size=step)(model, x, y)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    logits, _ = predict(model, x, batch_size)
    return float((logits.argmax(1).cpu() == y.cpu()).float().mean())


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def prepare_data(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    full = load_dataset(cfg.dataset, "train", cfg.data_dir)
    train, val = train_val_split(full, min(cfg.n_val, len(full) // 10), seed=0)
    if cfg.limit_train:
        train = train.subset(slice(0, cfg.limit_train))
    return train, val


def train(model_cfg: ModelConfig, cfg: TrainConfig, out_dir: str | os.PathLike[str], resume: bool = False,
          command: str = "", init_from: str | None = None, show_progress: bool = True) -> tuple[ConvNet, Checkpoint]:
    """Train, checkpoint to out_dir/last periodically, write out_dir/final and summary.json."""
    out = Path(out_dir)
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    torch.manual_seed(cfg.seed)
    train_ds, val_ds = prepare_data(cfg)
    if not model_cfg.class_names:
        model_cfg = replace(model_cfg, class_names=train_ds.class_names)
    if model_cfg.input_shape != train_ds.input_shape:
        model_cfg = replace(model_cfg, input_shape=train_ds.input_shape)

    model = build_model(model_cfg)
    if init_from:
        src, _ = load_checkpoint(init_from)
        if src.config.to_dict() != model_cfg.to_dict():
            raise ValueError(f"--init-from {init_from}: its model config differs from the requested one")
        model.load_state_dict(src.state_dict())
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0.0)

    n_local = len(train_ds) // info.world_size
    iters_per_epoch = max(1, n_local // cfg.batch_size)
    total = int(math.ceil(cfg.epochs * iters_per_epoch)) if cfg.epochs > 0 else cfg.iterations

    ckpt = Checkpoint(model_cfg, cfg.to_dict(), command=command, dataset=cfg.dataset, git_commit=git_commit())
    start_iter = 0
    if resume and (out / "last").is_dir():
        loaded, prev = load_checkpoint(out / "last")
        model.load_state_dict(loaded.state_dict())
        load_optimizer_state(out / "last", optimizer)
        start_iter = prev.iteration
        ckpt.metrics = prev.metrics
        log.info("resumed from %s at iteration %d", out / "last", start_iter)

    net: nn.Module = model
    if info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    x_all, y_all = train_ds.images, train_ds.labels
    bar = tqdm(total=total, initial=start_iter, disable=not (show_progress and info.is_main), unit="it",
               dynamic_ncols=True, file=sys.stderr)
    it = start_iter
    t0 = time.time()
    running_loss, running_acc = 0.0, 0.0
    model.train()
    while it < total:
        epoch = it // iters_per_epoch
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)  # same order on every rank
        perm = torch.randperm(len(train_ds), generator=g)[info.rank::info.world_size]
        perm = perm[: iters_per_epoch * cfg.batch_size]
        first = it - epoch * iters_per_epoch
        for b in range(first, iters_per_epoch):
            if it >= total:
                break
            idx = perm[b * cfg.batch_size: (b + 1) * cfg.batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, total, cfg)
            eps = eps_at(it, iters_per_epoch, cfg)
            x_adv = adversarial_batch(model, x, y, eps, cfg)  # attacks the bare module (not DDP)
            model.train()
            if x_adv is x or cfg.adv_weight >= 1.0:
                logits, _ = net(x_adv)
                loss = head_loss(model, logits, y, it, cfg.objective)
            else:  # one forward over [clean; adversarial] (one DDP forward per backward)
                n = len(x)
                both, _ = net(torch.cat([x, x_adv]))
                logits = both[n:]
                loss = ((1 - cfg.adv_weight) * head_loss(model, both, y, it, cfg.objective, rows=slice(0, n))
                        + cfg.adv_weight * head_loss(model, both, y, it, cfg.objective, rows=slice(n, None)))
            loss = loss + regularizer(model, cfg.objective).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
            loss_value = loss.item()
            running_loss = 0.98 * running_loss + 0.02 * loss_value if it > 1 else loss_value
            acc = float((logits.argmax(1) == y).float().mean())
            running_acc = 0.98 * running_acc + 0.02 * acc if it > 1 else acc
            if info.is_main:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{running_loss:.3f}", acc=f"{running_acc:.3f}", eps=f"{eps:.3f}")
            if info.is_main and cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                ckpt.iteration, ckpt.epoch = it, epoch
                save_checkpoint(out / "last", model, ckpt, optimizer)
        if info.is_main and it < total:
            va = accuracy(model, val_ds.images.to(device), val_ds.labels.to(device))
            log.info("epoch %d: iteration %d/%d, val accuracy %.4f, %.0fs", epoch, it, total, va, time.time() - t0)
            bar.write(f"epoch {epoch}: iteration {it}/{total}  val accuracy {va:.4f}  ({time.time() - t0:.0f}s)")
            model.train()
    bar.close()
    minutes = (time.time() - t0) / 60

    digest = weights_digest(model)
    if info.world_size > 1:
        digests: list[Any] = [None] * info.world_size
        dist.all_gather_object(digests, digest)
        (out / f"rank{info.rank}.digest").parent.mkdir(parents=True, exist_ok=True)
        (out / f"rank{info.rank}.digest").write_text(digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different weights: {digests}")

    if not info.is_main:
        dist.barrier()
        return model, ckpt

    model.eval()
    val_acc = accuracy(model, val_ds.images.to(device), val_ds.labels.to(device))
    chance = 1.0 / model_cfg.num_classes
    ckpt.learned = val_acc >= chance + cfg.min_accuracy_over_chance
    ckpt.angle_stats = compute_angle_stats(model, train_ds.images.to(device), train_ds.labels.to(device),
                                           model_cfg.num_classes)
    ckpt.iteration, ckpt.epoch = it, it // iters_per_epoch
    ckpt.metrics = {**ckpt.metrics, "val_accuracy": val_acc, "train_minutes": round(minutes, 2),
                    "iterations": it, "n_train": len(train_ds), "n_val": len(val_ds),
                    "world_size": info.world_size, "weights_sha256": digest}
    save_checkpoint(out / "final", model, ckpt, optimizer)
    summary = {"learned": ckpt.learned, **ckpt.metrics, "checkpoint": str(out / "final"),
               "angle_mean_deg": list(ckpt.angle_stats.mean_deg), "angle_std_deg": list(ckpt.angle_stats.std_deg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if info.world_size > 1:
        dist.barrier()
    if not ckpt.learned:
        raise TrainingDidNotLearn(
            f"the run did not learn: validation accuracy {val_acc:.3f} is within "
            f"{cfg.min_accuracy_over_chance:.2f} of chance ({chance:.2f}); checkpoint marked learned=false "
            f"(try --natural-epochs and --eps-warmup-epochs)")
    return model, ckpt
