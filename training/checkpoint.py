"""Checkpoints: a directory with `model.safetensors` (weights), `optimizer.safetensors`
(Adam state, for --resume), `rng.safetensors` (the random generators' states, so that a
resumed run continues exactly) and `checkpoint.json` (model config, training config, angle
statistics, progress, metrics). Never pickle: a checkpoint rebuilds its model alone.

A run directory holds `last/` (periodic), `best/` (highest validation PGD accuracy, in
adversarial runs) and `final/`; given a run directory, `load_checkpoint` takes `best/`,
else `final/`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.angle_stats import AngleStats
from training.models import ConvNet, ModelConfig, build_model

log = logging.getLogger("dsphere.train")

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
META = "checkpoint.json"


class CheckpointError(Exception):
    """A checkpoint is missing or unreadable; one line for the user."""


@dataclass
class Checkpoint:
    model_config: ModelConfig
    training_config: dict[str, Any] = field(default_factory=dict)
    angle_stats: AngleStats | None = None
    iteration: int = 0
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    dataset: str = ""
    git_commit: str | None = None
    learned: bool | None = None  # None while training, then whether the run learned

    def meta(self) -> dict[str, Any]:
        return {
            "format": 1,
            "model_config": self.model_config.to_dict(),
            "training_config": self.training_config,
            "angle_stats": self.angle_stats.to_dict() if self.angle_stats else None,
            "iteration": self.iteration,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "command": self.command,
            "dataset": self.dataset,
            "git_commit": self.git_commit,
            "learned": self.learned,
        }


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().clone().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(path: str | os.PathLike[str], model: ConvNet, ckpt: Checkpoint,
                    optimizer: torch.optim.Optimizer | None = None, rng: bool = False) -> Path:
    """Write atomically: into a temporary sibling directory, then rename over."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    meta = ckpt.meta()
    if optimizer is not None:
        tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER))
        meta["optimizer"] = opt_meta
    if rng:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            states.update({f"cuda{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
        save_file(states, str(tmp / RNG))
    (tmp / META).write_text(json.dumps(meta, indent=2))
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            _rmtree(old)
        target.rename(old)
        tmp.rename(target)
        _rmtree(old)
    else:
        tmp.rename(target)
    return target


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def restore_rng(path: str | os.PathLike[str]) -> bool:
    """Set the random generators to the states saved with a checkpoint; False if none."""
    f = Path(path) / RNG
    if not f.is_file():
        return False
    states = load_file(str(f))
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return True


def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory as given, or a run directory's best/ (else final/)."""
    d = Path(path)
    if not (d / META).is_file():
        for sub in ("best", "final"):
            if (d / sub / META).is_file():
                return d / sub
    return d


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> tuple[ConvNet, Checkpoint]:
    d = checkpoint_dir(path)
    if not (d / META).is_file() or not (d / WEIGHTS).is_file():
        raise CheckpointError(f"{d} is not a checkpoint: expected {META} and {WEIGHTS} in it, "
                              "or a run directory with best/ or final/")
    try:
        meta = json.loads((d / META).read_text())
        cfg = ModelConfig.from_dict(meta["model_config"])
        model = build_model(cfg)
        model.load_state_dict(load_file(str(d / WEIGHTS), device=map_location))
    except (KeyError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot load checkpoint {d}: {type(e).__name__}: {e}") from None
    stats = AngleStats.from_dict(meta["angle_stats"]) if meta.get("angle_stats") else None
    ckpt = Checkpoint(cfg, meta.get("training_config", {}), stats, meta.get("iteration", 0), meta.get("epoch", 0),
                      meta.get("metrics", {}), meta.get("command", ""), meta.get("dataset", ""),
                      meta.get("git_commit"), meta.get("learned"))
    return model, ckpt


def load_optimizer_state(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer) -> bool:
    d = Path(path)
    if not (d / OPTIMIZER).is_file():
        return False
    meta = json.loads((d / META).read_text())["optimizer"]
    tensors = load_file(str(d / OPTIMIZER))
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return True


def keep_checkpoint(run: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy a run's chosen checkpoint (best/, else final/) to `dest`: weights and metadata
    only (no optimizer or random state: a kept checkpoint is for export and evaluation,
    small enough to commit), plus the run's summary.json beside them."""
    import shutil

    src = checkpoint_dir(run)
    model, ckpt = load_checkpoint(src)  # refuses what is not a checkpoint
    if ckpt.learned is not True or ckpt.angle_stats is None:
        raise CheckpointError(f"{src} is not a finished, exportable checkpoint (learned={ckpt.learned})")
    out = save_checkpoint(dest, model, ckpt)
    summary = Path(run) / "summary.json"
    if summary.is_file():
        shutil.copyfile(summary, out / "summary.json")
    return out


def init_weights(model: ConvNet, init_from: str) -> None:
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
